"""The trajectory viewer: episodes rendered to one self-contained HTML page.

    python -m agents.viewer runs/eval/transcripts/model.jsonl -o page.html
    python -m agents.viewer runs/demos/oracle.jsonl -o page.html     # any JSONL of agents.jsonl.write_jsonl

For each episode: the task (question, input images, ground truth), then every assistant turn
(its thinking, code or answer, the parse error of a malformed turn), the env's reply (text,
execution error, output images), the turn's reward and the ops its code applied, and at the end
the final answer and every reward component. Images are inline base64 PNG thumbnails, so the
page is one file that opens anywhere offline; all model text is HTML-escaped.

From Python:

    write_html([Transcript.of(t, task) for t, task in zip(trajectories, tasks)], "page.html")
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from agents.transcript import Transcript, TurnRecord, read_transcripts

__all__ = ["render_html", "write_html", "load_episodes", "thumbnail_data_uri", "main"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header.page{padding:16px 24px;background:#1d2330;color:#fff}
header.page h1{margin:0 0 4px;font-size:20px}
header.page p{margin:0;opacity:.8;font-size:13px}
nav{padding:8px 24px;font-size:13px;background:#e6e8ee}
nav a{margin-right:10px;color:#1d4ed8;text-decoration:none}
nav a.fail{color:#b42318}
section.episode{background:#fff;margin:16px 24px;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);overflow:hidden}
section.episode>header{display:flex;flex-wrap:wrap;gap:8px 16px;align-items:baseline;padding:10px 16px;border-left:6px solid #12b76a;background:#f6fef9}
section.episode.fail>header{border-left-color:#f04438;background:#fef3f2}
.badge{font-size:12px;padding:2px 8px;border-radius:10px;background:#e6e8ee}
.badge.ok{background:#d1fadf;color:#05603a}.badge.bad{background:#fee4e2;color:#912018}
.task{padding:8px 16px;display:grid;grid-template-columns:minmax(0,1fr) minmax(180px,360px);gap:12px}
.question{white-space:pre-wrap;font-size:14px}
.images{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0}
figure{margin:0;text-align:center;font-size:11px;color:#555}
figure img{display:block;max-width:320px;max-height:320px;border:1px solid #ccd;background:#fafafa}
.turn{margin:8px 16px;border:1px solid #e3e5ea;border-radius:6px}
.turn>h3{margin:0;padding:6px 10px;font-size:13px;background:#f0f2f5;display:flex;gap:12px;align-items:baseline}
.turn .body{padding:6px 10px}
.label{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#667085;margin-top:6px}
.thinking{white-space:pre-wrap;font-style:italic;color:#344054;font-size:13px}
pre{margin:4px 0;padding:8px;background:#0f172a;color:#e2e8f0;border-radius:4px;font-size:12px;white-space:pre-wrap;word-break:break-word}
pre.reply{background:#eef4ff;color:#1d2330}
pre.reply.error,pre.error{background:#fef3f2;color:#912018}
.answer{font-weight:600;word-break:break-word}
.reward{margin-left:auto;font-variant-numeric:tabular-nums}
.pos{color:#05603a}.neg{color:#b42318}
.op{display:inline-block;font-size:11px;padding:1px 6px;margin-right:4px;border-radius:8px;background:#e0eaff;color:#1d4ed8}
table.components{border-collapse:collapse;margin:8px 16px 14px;font-size:12px}
table.components td,table.components th{border:1px solid #e3e5ea;padding:3px 8px;text-align:right}
table.components th{background:#f0f2f5}
details{margin-top:4px;font-size:12px}
"""


def thumbnail_data_uri(image: Image.Image, max_side: int = 320) -> str:
    """A `data:image/png;base64,...` URI of `image` downscaled to at most `max_side` pixels a side."""
    thumb = image.convert("RGB") if image.mode not in ("RGB", "L") else image.copy()
    thumb.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _images(images: Sequence[Image.Image], first_index: int, max_side: int) -> str:
    if not images:
        return ""
    figures = [
        f'<figure><img src="{thumbnail_data_uri(im, max_side)}" alt="image {first_index + i}">'
        f"<figcaption>image {first_index + i} · {im.width}×{im.height}</figcaption></figure>"
        for i, im in enumerate(images)
    ]
    return '<div class="images">' + "".join(figures) + "</div>"


def _signed(value: float) -> str:
    value = float(value) + 0.0  # no "-0.000"
    cls = "pos" if value > 0 else "neg" if value < 0 else ""
    return f'<span class="{cls}">{value:+.3f}</span>'


def _turn_html(number: int, turn: TurnRecord, next_image: int, max_side: int) -> str:
    kind = {"tool_call": "tool call", "answer": "answer", "invalid": "malformed turn"}.get(turn.kind, turn.kind)
    parts = [f'<div class="turn"><h3><span>Turn {number}</span><span class="badge">{_e(kind)}</span>']
    if turn.tool_ok is not None:
        parts.append(f'<span class="badge {"ok" if turn.tool_ok else "bad"}">{"ran" if turn.tool_ok else "failed"}</span>')
    parts.append(f'<span class="reward">reward {_signed(turn.reward)}</span></h3><div class="body">')
    if turn.thinking:
        parts.append(f'<div class="label">thinking</div><div class="thinking">{_e(turn.thinking)}</div>')
    if turn.kind == "tool_call":
        about = f" on image {turn.image_index}" if turn.image_index is not None else ""
        if turn.description:
            about += f" — {_e(turn.description)}"
        parts.append(f'<div class="label">code{about}</div><pre class="code">{_e(turn.code)}</pre>')
    elif turn.kind == "answer":
        parts.append(f'<div class="label">answer</div><div class="answer">{_e(turn.answer)}</div>')
    elif not turn.tool_text:  # else the env's reply below already says why
        parts.append(f'<div class="label">why it could not be used</div><pre class="error">{_e(turn.error)}</pre>')
    if turn.tool_text or turn.tool_images:
        error = " error" if turn.tool_ok is False else ""
        parts.append(f'<div class="label">environment reply</div><pre class="reply{error}">{_e(turn.tool_text)}</pre>')
        parts.append(_images(turn.tool_images, next_image, max_side))
    if turn.ops:
        parts.append('<div class="label">ops applied</div>' + "".join(f'<span class="op">{_e(op)}</span>' for op in turn.ops))
    if turn.kind != "answer":  # open for malformed turns: the raw text is what went wrong
        opened = " open" if turn.kind == "invalid" else ""
        parts.append(f"<details{opened}><summary>raw turn text</summary><pre>{_e(turn.text)}</pre></details>")
    parts.append("</div></div>")
    return "".join(parts)


def _episode_html(index: int, episode: Transcript, max_side: int) -> str:
    status = "ok" if episode.success else "fail"
    tags = [episode.category, episode.variant, episode.agent, f"sample {episode.sample_index}" if episode.sample_index else ""]
    badges = "".join(f'<span class="badge">{_e(t)}</span>' for t in tags if t)
    verdict = f'<span class="badge {"ok" if episode.success else "bad"}">{"correct" if episode.success else "wrong"}</span>'
    truncated = f'<span class="badge bad">truncated: {_e(episode.truncation or "yes")}</span>' if episode.truncated else ""
    ops = "".join(f'<span class="op">{_e(op)}</span>' for op in episode.used_ops) or "none"
    parts = [
        f'<section class="episode {status}" id="ep{index}"><header><strong>{_e(episode.task_id)}</strong>{badges}'
        f'{verdict}{truncated}<span class="reward">total reward {_signed(episode.reward)}</span></header>',
        f'<div class="task"><div><div class="label">question</div><div class="question">{_e(episode.question)}</div>'
        f'{_images(episode.input_images, 0, max_side)}</div>'
        f'<div><div class="label">ground truth</div><div class="answer">{_e(episode.ground_truth)}</div>'
        f'<div class="label">final answer</div><div class="answer">{_e(episode.answer)}</div>'
        f'<div class="label">ops used</div>{ops}</div></div>',
    ]
    next_image = len(episode.input_images)
    for number, turn in enumerate(episode.turns, 1):
        parts.append(_turn_html(number, turn, next_image, max_side))
        next_image += len(turn.tool_images)
    if episode.reward_components:
        names = list(episode.reward_components)
        parts.append('<table class="components"><tr>' + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr><tr>"
                     + "".join(f"<td>{episode.reward_components[n] + 0.0:.3f}</td>" for n in names) + "</tr></table>")
    parts.append("</section>")
    return "".join(parts)


def render_html(episodes: Sequence[Transcript], title: str = "CodeVision episodes", subtitle: str = "",
                max_side: int = 320) -> str:
    """One self-contained HTML page showing `episodes` (see the module docstring)."""
    episodes = list(episodes)
    correct = sum(bool(e.success) for e in episodes)
    summary = f"{len(episodes)} episode(s), {correct} correct" + (f" · {subtitle}" if subtitle else "")
    links = "".join(f'<a href="#ep{i}" class="{"" if e.success else "fail"}">{i + 1}. {_e(e.task_id)}</a>'
                    for i, e in enumerate(episodes))
    body = "".join(_episode_html(i, e, max_side) for i, e in enumerate(episodes))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body><header class=\"page\"><h1>{_e(title)}</h1><p>{_e(summary)}</p>"
            f"</header><nav>{links}</nav>{body}</body></html>\n")


def write_html(episodes: Sequence[Transcript], path: str | os.PathLike, title: str = "CodeVision episodes",
               subtitle: str = "", max_side: int = 320) -> Path:
    """Render `episodes` and write the page to `path` (folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(episodes, title, subtitle, max_side), encoding="utf-8")
    return path


def load_episodes(path: str | os.PathLike) -> list[Transcript]:
    """Episodes from a JSONL of transcripts or trajectories (`agents.jsonl.write_jsonl`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a .jsonl written by agents.jsonl.write_jsonl")
    return read_transcripts(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render episodes (transcript or trajectory JSONL) to one HTML page.")
    parser.add_argument("jsonl", help="a transcripts (algos.evaluate) or trajectories .jsonl (agents.jsonl.write_jsonl)")
    parser.add_argument("-o", "--output", help="the HTML file to write (default: the input with .html)")
    parser.add_argument("--limit", type=int, default=0, help="render only the first N episodes (0 = all)")
    parser.add_argument("--failures", action="store_true", help="render only the episodes answered wrong")
    parser.add_argument("--title", default=None, help="page title (default: the file name)")
    args = parser.parse_args(argv)
    try:
        episodes = load_episodes(args.jsonl)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.failures:
        episodes = [e for e in episodes if not e.success]
    if args.limit > 0:
        episodes = episodes[: args.limit]
    output = Path(args.output or Path(args.jsonl).with_suffix(".html"))
    write_html(episodes, output, title=args.title or Path(args.jsonl).name)
    print(f"wrote {len(episodes)} episode(s) to {output} ({output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
