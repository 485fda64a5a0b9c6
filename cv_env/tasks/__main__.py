"""Command line for task sources.

    python -m cv_env.tasks export --suite default --split test --n 1000 --out test.parquet
    python -m cv_env.tasks preview --n 16 --out preview.png      # a contact sheet with Q and A
    python -m cv_env.tasks list                                  # categories and default shares

`--suite` takes what `load_tasks` takes: default/synthetic, category names (comma-separated),
or a parquet path. `--robustness` wraps the source in the robustness wrapper.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time

from PIL import Image, ImageDraw

from cv_env.tasks import RobustnessWrapper, load_tasks, write_parquet
from cv_env.tasks.draw import font
from cv_env.tasks.suite import categories_table


def _source(args):
    kwargs = {}
    spec = args.suite
    is_file = spec.endswith(".parquet") or "*" in spec
    if not is_file:
        kwargs = {"difficulty": int(args.difficulty) if args.difficulty != "mixed" else "mixed"}
        if getattr(args, "n", None):
            kwargs["size"] = args.n
    src = load_tasks("synthetic" if spec == "default" else spec, split=args.split, seed=args.seed, **kwargs)
    if args.robustness:
        src = RobustnessWrapper(src)
    return src


def cmd_export(args) -> int:
    src = _source(args)
    per_task = len(src.variants) if args.robustness else 1  # --n counts base tasks
    n = min(args.n * per_task, len(src)) if args.n else len(src)
    start = time.perf_counter()
    rows = write_parquet((src[i] for i in range(n)), args.out, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    print(f"wrote {rows} tasks to {args.out} in {seconds:.1f} s ({rows / max(seconds, 1e-9):.0f} tasks/s)")
    return 0


def _thumbnail(task, cell: int) -> Image.Image:
    """The task's images side by side, scaled into a cell x cell square, bbox drawn in red."""
    images = []
    for k, image in enumerate(task.images):
        image = image.convert("RGB")
        if k == 0 and task.bbox is not None:
            image = image.copy()
            x1, y1, x2, y2 = task.bbox
            pad = max(image.size) // 100  # a tiny target needs a visible ring around it
            ImageDraw.Draw(image).rectangle((x1 - pad, y1 - pad, x2 + pad, y2 + pad), outline=(255, 0, 0),
                                            width=max(2, pad // 2))
        images.append(image)
    gap = 6
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    height = max(im.height for im in images)
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for im in images:
        strip.paste(im, (x, 0))
        x += im.width + gap
    strip.thumbnail((cell, cell))
    return strip


def cmd_preview(args) -> int:
    src = _source(args)
    n = min(args.n, len(src))
    cell, text_h, cols = 300, 150, args.cols
    rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cell + 10) + 10, rows * (cell + text_h + 10) + 10), (236, 236, 236))
    d = ImageDraw.Draw(sheet)
    small = font(12)
    for i in range(n):
        task = src[i]
        x0 = 10 + (i % cols) * (cell + 10)
        y0 = 10 + (i // cols) * (cell + text_h + 10)
        d.rectangle((x0, y0, x0 + cell, y0 + cell + text_h), fill=(255, 255, 255))
        thumb = _thumbnail(task, cell)
        sheet.paste(thumb, (x0 + (cell - thumb.width) // 2, y0 + (cell - thumb.height) // 2))
        lines = [f"{task.category}  {task.transforms or '[]'}"]
        if task.extra.get("corruption"):
            lines[0] += f"  corruption={task.extra['corruption']}"
        lines += textwrap.wrap("Q: " + task.question, width=48)[:7]
        lines.append(f"A: {task.answer}  ({task.answer_type})")
        for j, line in enumerate(lines):
            d.text((x0 + 4, y0 + cell + 4 + 15 * j), line, font=small, fill=(0, 0, 160) if j == len(lines) - 1 else (0, 0, 0))
    sheet.save(args.out)
    print(f"wrote a contact sheet of {n} tasks to {args.out}")
    return 0


def cmd_list(args) -> int:
    for name, description, share in categories_table():
        print(f"{name:24s} {share:>2d}/20  {description}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cv_env.tasks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in (("export", cmd_export, "write tasks to a CodeVision-RL parquet file"),
                              ("preview", cmd_preview, "draw a contact sheet PNG of tasks with Q and A")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--suite", default="default", help="default, category name(s), or a parquet path")
        p.add_argument("--split", default="test", choices=["train", "validation", "test"])
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--difficulty", default="1", choices=["0", "1", "2", "mixed"])
        p.add_argument("--robustness", action="store_true", help="add the five orientation variants of each task")
        p.add_argument("--out", required=True)
        p.set_defaults(func=func)
    sub.choices["export"].add_argument("--n", type=int, default=1000, help="number of tasks (0: all); with --robustness, of base tasks")
    sub.choices["export"].add_argument("--batch-size", type=int, default=64, help="rows per row group")
    sub.choices["preview"].add_argument("--n", type=int, default=16)
    sub.choices["preview"].add_argument("--cols", type=int, default=4)
    sub.add_parser("list", help="list the categories").set_defaults(func=cmd_list)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
