"""`python -m lorafactory.variants`: the registered variants, by taxonomy axis, with what each costs and where
it comes from. `--markdown` prints the same as a Markdown table (for docs)."""

from __future__ import annotations

import argparse
import textwrap

from lorafactory.variants import VARIANTS
from lorafactory.variants.base import TAXONOMY

MARKDOWN_TITLE = """# The variant zoo

Every registered variant, by taxonomy axis (`python -m lorafactory.variants --markdown > docs/zoo.md` writes this
page; a test checks it is current). Use one: `python -m lorafactory variant=<variant>`; its file is
`lorafactory/variants/<variant>.py`, whose docstring gives the update rule and every choice made where the paper is
ambiguous.
"""

COLUMNS = ("variant", "axis", "tags", "mergeable", "zero-init", "trainable params / layer", "PEFT")


def rows() -> list[tuple[str, ...]]:
    order = {axis: i for i, axis in enumerate(TAXONOMY)}
    out = []
    for name in sorted(VARIANTS.names(), key=lambda n: (order.get(VARIANTS.get(n).taxonomy, 99), n)):
        cls = VARIANTS.get(name)
        out.append(
            (
                name,
                cls.taxonomy,
                ", ".join(cls.tags) or "-",
                "yes" if cls.mergeable else "no",
                "yes" if cls.zero_init else "no",
                cls.params_formula,
                cls.peft or "-",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    table = rows()
    if args.markdown:
        print(MARKDOWN_TITLE)
        print("| " + " | ".join(COLUMNS) + " | paper |")
        print("|" + "---|" * (len(COLUMNS) + 1))
        for row in table:
            cls = VARIANTS.get(row[0])
            memory = f" (memory: {cls.memory_note})" if cls.memory_note else ""
            print("| " + " | ".join(row) + f" | {cls.paper}{memory} |")
        return
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(COLUMNS)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*COLUMNS))
    print(line.format(*("-" * w for w in widths)))
    for row in table:
        print(line.format(*row))
        cls = VARIANTS.get(row[0])
        print(textwrap.indent(cls.paper, " " * (widths[0] + 2)))
        if cls.memory_note:
            print(textwrap.indent(f"memory: {cls.memory_note}", " " * (widths[0] + 2)))
    print(f"\n{len(table)} variants. Use one: python -m lorafactory variant=<variant>")


if __name__ == "__main__":
    main()
