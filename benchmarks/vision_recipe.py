"""The measurements behind the image-folder recipe (docs/vision.md): one `train vision` run per variant.

    python -m benchmarks.image_folders digits28 data/digits28
    python -m benchmarks.vision_recipe data/digits28 --variants recipe,inception-crop,mixup --out runs/recipe

Each variant is the default command (``mlpmixer train vision --data-dir DIR``) plus the flags listed
in VARIANTS, run alone in its own process; the table gives the final and best validation top-1 and
the wall time of the whole command (start-up, decoding, training, validation, checkpoints). The
recipe is chosen on val/; a folder's test/ split is evaluated only with ``--test``, for the final table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # flags added to the default command; the rows of docs/vision.md were run with exactly these
    "recipe": [],  # the default command
    "old-default": ["--model", "mixer_tiny_digits", "--img-size", "28"],  # the preset the issue measured (patch 2), Inception crops
    "inception-crop": ["--crop-scale", "0.08"],
    "rotate-shift": ["--rotate", "10", "--translate", "0.1"],
    "rotate-shift-mixup": ["--rotate", "10", "--translate", "0.1", "--mixup-alpha", "0.2"],
    "rotate-shift-c96x6": ["--rotate", "10", "--translate", "0.1", "--hidden-dim", "96", "--tokens-mlp-dim", "48",
                           "--channels-mlp-dim", "384", "--num-blocks", "6"],
    "c96x6": ["--hidden-dim", "96", "--tokens-mlp-dim", "48", "--channels-mlp-dim", "384", "--num-blocks", "6"],
    "c128x6": ["--hidden-dim", "128", "--tokens-mlp-dim", "64", "--channels-mlp-dim", "512", "--num-blocks", "6"],
}


def run(folder: str, name: str, flags: list[str], out: Path, extra: list[str], test: bool) -> dict:
    run_dir = out / name
    command = [sys.executable, "-m", "mlpmixer", "train", "vision", "--data-dir", folder, "--out", str(run_dir),
               "--overwrite", "--quiet", *flags, *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in rows if "val_top1" in r]
    result = {"variant": name, "flags": " ".join(flags + extra), "final": val[-1]["val_top1"],
              "best": max(r["val_top1"] for r in val), "epochs": len(val), "wall_s": wall}
    if test:
        report = subprocess.run([sys.executable, "-m", "mlpmixer", "evaluate", str(run_dir), "--data-dir",
                                 str(Path(folder) / "test"), "--json"], check=True, capture_output=True, text=True)
        result["test"] = json.loads(report.stdout)["val_top1"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--variants", default="recipe", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="runs/recipe")
    parser.add_argument("--extra", default="", help="flags added to every variant, e.g. '--epochs 10 --threads 1'")
    parser.add_argument("--test", action="store_true", help="also evaluate on FOLDER/test (final table only)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        result = run(args.folder, name, VARIANTS[name], out, args.extra.split(), args.test)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps({"folder": args.folder, **result}) + "\n")
        print(f"| {Path(args.folder).name} | {name} | `{result['flags']}` | {result['final']:.2%} | "
              f"{result['best']:.2%} | {result['wall_s'] / 60:.1f} min |" +
              (f" {result['test']:.2%} |" if "test" in result else ""), flush=True)


if __name__ == "__main__":
    main()
