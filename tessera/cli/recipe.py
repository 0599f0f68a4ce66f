"""`tessera recipe NAME`: a recipe from data to a measured model in one command (tessera/recipes)."""
from __future__ import annotations

import argparse

from tessera.recipes.runner import RECIPES_DIR, recipe_names


def cmd_recipe(args, overrides: list[str]) -> None:
    from tessera.recipes.runner import run_recipe

    run_recipe(args.name, args.out, args.smoke, overrides, args.prepare_only)


def _listing() -> str:
    lines = ["recipes (configs/recipes/NAME/: train.toml, README.md):"]
    for name in recipe_names():
        title = (RECIPES_DIR / name / "README.md").read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        lines.append(f"  {name:<18} {title}")
    return "\n".join(lines)


def add_parsers(sub) -> None:
    what = "run a recipe: prepare data, train, evaluate before/after, sample, write summary.md"
    rp = sub.add_parser("recipe", help=what, description=f"{what}: tessera recipe NAME [--smoke] [--out DIR] "
                        "--section.key=value ...", epilog=_listing(), formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("name", metavar="NAME", choices=recipe_names(), help="the recipe (listed below)")
    rp.add_argument("--smoke", action="store_true", help="tiny sizes: the whole recipe in seconds (what the tests run)")
    rp.add_argument("--out", help="run directory (default: the recipe's train.run_dir; with --smoke, that + _smoke)")
    rp.add_argument("--prepare-only", action="store_true",
                    help="prepare the data (data.path) and stop: for a launch config that trains elsewhere")
    rp.set_defaults(func=cmd_recipe, takes_overrides=True)
