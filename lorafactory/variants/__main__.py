"""`python -m lorafactory.variants`: the registered variants, by taxonomy axis, with what each costs and where
it comes from. `--markdown` prints the same as a Markdown table (for docs)."""

from __future__ import annotations

import argparse
import textwrap

from lorafactory.variants import VARIANTS
from lorafactory.variants.base import TAXONOMY

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
        print("| " + " | ".join(COLUMNS) + " | paper |")
        print("|" + "---|" * (len(COLUMNS) + 1))
        for row in table:
            print("| " + " | ".join(row) + f" | {VARIANTS.get(row[0]).paper} |")
        return
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(COLUMNS)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*COLUMNS))
    print(line.format(*("-" * w for w in widths)))
    for row in table:
        print(line.format(*row))
        print(textwrap.indent(VARIANTS.get(row[0]).paper, " " * (widths[0] + 2)))
    print(f"\n{len(table)} variants. Use one: python -m lorafactory variant=<variant>")


if __name__ == "__main__":
    main()
