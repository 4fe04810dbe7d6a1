"""Training: the trainer loop and its set-up, config, guards, loss, autoanchor, loggers, distillation and QAT set-up."""
