"""Graphviz (.gv) pictures of a traced or prepared model: fused chains and alignment groups coloured.

Example:
    >>> gm = trace(model, leaf_classes=("Detect",))
    >>> write_graphviz(gm, "runs/graphs/model.gv", find_conv_bn_act(gm), find_alignment_groups(gm))
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch.fx as fx

from quant.graph import Chain, Group, _module

__all__ = ["write_graphviz"]

LOGGER = logging.getLogger(__name__)

_PALETTE = ("#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
            "#bc80bd", "#ccebc5", "#ffed6f", "#a6cee3", "#b2df8a", "#fb9a99", "#fdbf6f", "#cab2d6")


def _quote(text: str) -> str:
    """Dot string literal; newlines become dot's centred line breaks."""
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n") + '"'


def _label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return f"{node.target}\n{type(mod).__name__}"
    if node.op in ("call_function", "call_method"):
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return f"{node.name}\n{target}"
    return f"{node.name}\n{node.op}"


def _node_style(gm: fx.GraphModule, node: fx.Node, colours: dict[int, str], group_colour: Optional[str]) -> str:
    mod = _module(gm, node)
    if mod is not None and "FakeQuant" in type(mod).__name__:
        # One colour per quantizer instance: shared quantizers show up as same-coloured diamonds.
        colour = colours.setdefault(id(mod), _PALETTE[len(colours) % len(_PALETTE)])
        return f'shape=diamond, style=filled, fillcolor="{colour}"'
    if group_colour is not None:
        return f'shape=box, style="filled,bold", fillcolor="{group_colour}"'
    if node.op in ("placeholder", "output"):
        return "shape=oval"
    return "shape=box"


def _dot_lines(gm: fx.GraphModule, chains: Sequence[Chain], groups: Sequence[Group], title: str) -> list[str]:
    in_chain = {name: i for i, c in enumerate(chains) for name in c.nodes if len(c.nodes) > 1}
    member_set: dict[str, int] = {}
    for g in groups:
        for name in (*g.inputs, g.output) if g.kind == "concat" else g.inputs:
            member_set.setdefault(name, g.share_id)
    lines = ["digraph G {", f"  label={_quote(title)};", "  labelloc=t;", "  rankdir=TB;",
             '  node [fontsize=10, fontname="Helvetica"];']
    colours: dict[int, str] = {}
    clusters: dict[int, list[str]] = {}
    for node in gm.graph.nodes:
        sid = member_set.get(node.name)
        colour = _PALETTE[sid % len(_PALETTE)] if sid is not None and sid >= 0 else None
        text = f"  {_quote(node.name)} [label={_quote(_label(gm, node))}, {_node_style(gm, node, colours, colour)}];"
        if node.name in in_chain:
            clusters.setdefault(in_chain[node.name], []).append(text)
        else:
            lines.append(text)
    for i, body in sorted(clusters.items()):
        lines += [f"  subgraph cluster_chain_{i} {{", f"    label={_quote('fuse ' + chains[i].describe())};",
                  '    style="rounded,filled"; fillcolor="#eeeeee"; color="#555555";', *body, "  }"]
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            lines.append(f"  {_quote(src.name)} -> {_quote(node.name)};")
    lines.append("}")
    return lines


def write_graphviz(gm: fx.GraphModule, path: Any, chains: Sequence[Chain] = (), groups: Sequence[Group] = (),
                   title: str = "") -> Any:
    """Write ``gm`` as Graphviz dot text: fusion chains as grey clusters, alignment-group members
    filled with one colour per shared set, fake-quant modules as diamonds coloured per instance.
    Also renders a .pdf next to it when the ``dot`` binary is on PATH.  Returns the .gv path."""
    import shutil
    import subprocess
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(_dot_lines(gm, chains, groups, title)) + "\n", encoding="utf-8")
    dot = shutil.which("dot")
    if dot is not None:
        result = subprocess.run([dot, "-Tpdf", str(path), "-o", str(path.with_suffix(".pdf"))],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            LOGGER.warning("%s: dot could not render the graph: %s", path, result.stderr.strip()[:200])
    return path
