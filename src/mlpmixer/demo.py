"""A local demo page: fill blanks, generate text, classify a digit you draw (``mlpmixer demo``).

One Gradio page with a tab per kind of run: *fill* (mlm), *generate* (lm, streamed), *classify*
(vision; upload or sketchpad). With no runs given it serves the shipped ones (`pretrained`). Gradio
is the optional extra ``mlpmixer[demo]``, imported only when a page is built; the inference helpers
here (`fill_table`, `generate_text`, `classify`, `to_digit`) need no Gradio. Served locally with
telemetry off and the theme's fonts served by Gradio itself, so the page fetches nothing from the
network.
"""

from __future__ import annotations

import argparse
import html
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import pretrained, runs
from .errors import UsageError

KINDS = {"mlm": "fill", "lm": "generate", "vision": "classify"}
"""Run task -> the tab that shows it."""
INK_THRESHOLD = 0.05
"""Ink (0 background .. 1 full stroke) above which a pixel counts when finding the digit's box."""
DIGIT_MARGIN = 0.0
"""Border added around the ink's box, as a fraction of its side: scikit-learn's digits fill all 8 rows."""
SHOWN = {" ": "␣", "\n": "⏎", "\t": "⇥"}


@dataclass
class DemoRun:
    """A run the page shows: its name, folder, task, and the model loaded once."""

    name: str
    path: Path
    task: str
    config: dict = field(repr=False)
    model: object = field(default=None, repr=False)
    tok: object = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return KINDS[self.task]


def open_runs(run_dirs: list[str | os.PathLike] | None = None) -> list[DemoRun]:
    """The runs to show (default: the shipped ones), each resolved, recognised and loaded."""
    from .hub import load  # mlpmixer.load: the public API

    opened = []
    for given in run_dirs or pretrained.names():
        path = pretrained.resolve(given)
        config = runs.read_run_config(path)
        task = config["task"]
        model, tok = load(path, task=task) if task in ("mlm", "lm") else (None, None)
        opened.append(DemoRun(str(given), path, task, config, model, tok))
    return opened


# --- inference, without Gradio ----------------------------------------------------------------------

def fill_table(run: DemoRun, text: str, top_k: int = 3, mask_char: str = "_") -> tuple[str, str]:
    """The filled text and an HTML table of each blank's top-k candidates with probabilities."""
    from .text import fill_mask

    expect(run, "mlm")
    if not text.strip():
        raise UsageError(f"the text is empty; type a sentence with {mask_char} where characters are missing")
    result = fill_mask(run.model, run.tok, text, mask_char=mask_char, top_k=int(top_k))
    rows = []
    for position, candidates in result.candidates:
        context = text[max(0, position - 12): position] + "▁" + text[position + 1: position + 13]
        cells = "".join(f"<td><code>{html.escape(SHOWN.get(c, c))}</code> {p:.1%}</td>" for c, p in candidates)
        rows.append(f"<tr><td>{position}</td><td><code>{html.escape(context)}</code></td>{cells}</tr>")
    heads = "".join(f"<th>#{i + 1}</th>" for i in range(len(result.candidates[0][1])))
    table = f"<table><tr><th>position</th><th>context</th>{heads}</tr>{''.join(rows)}</table>"
    return result.text, table


def generate_text(run: DemoRun, prompt: str, length: int = 200, temperature: float = 0.8, top_k: int = 0,
                  seed: int | None = 0) -> Iterator[str]:
    """The prompt and its continuation so far, after each new character (for streaming)."""
    from .text import generate

    expect(run, "lm")
    if not prompt:
        raise UsageError("the prompt is empty; type at least one character, e.g. ROMEO:")
    unknown = sorted({c for c in prompt if c not in run.tok.stoi})
    if unknown:
        raise UsageError(f"characters not in the model's vocabulary: {''.join(unknown)!r}; remove or replace them")
    text = prompt
    for ch in generate(run.model, run.tok, prompt, int(length), float(temperature), int(top_k) or None,
                       None if seed is None or seed < 0 else int(seed)):
        text += ch
        yield text


def is_digits(run: DemoRun) -> bool:
    """A classifier of scikit-learn's digits: its inputs are 8x8 white-on-black strokes."""
    data = run.config.get("data") or {}
    return data.get("dataset") == "digits" or (run.config.get("source") or {}).get("dataset") == "digits"


def classify(run: DemoRun, image, top_k: int = 5) -> tuple[dict[str, float], np.ndarray]:
    """The ``top_k`` classes with probabilities, and the image the model saw (H, W[, C] in [0, 1]).

    ``image`` is a file path, a Pillow image or an array. A digits classifier gets it as its training
    images were (`to_digit`); any other run gets the file as ``mlpmixer predict`` would.
    """
    from .data.images import open_image
    from .vision_train import predict

    expect(run, "vision")
    if image is None:
        raise UsageError("no image yet: upload an image file or draw a digit first")
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)  # an unreadable file is one DataError sentence
    with tempfile.TemporaryDirectory(prefix="mlpmixer-demo-") as tmp:
        path = Path(tmp) / "input.png"
        seen = to_digit(image) if is_digits(run) else as_array(image, background=1.0)
        save_png(seen, path)
        top = predict(run.path, [path], top_k=top_k)[0]
    return dict(top), seen


def as_array(image, background: float = 1.0) -> np.ndarray:
    """Any image (Pillow, or an (H, W), (H, W, 3), (H, W, 4) array, 8-bit or float) as floats in [0, 1],
    greyscale (H, W) or RGB (H, W, 3); transparent pixels become ``background`` (a sketchpad's paper)."""
    if hasattr(image, "mode"):  # Pillow
        from .data.images import to_mode

        image = np.asarray(to_mode(image, "RGBA" if "A" in image.mode or image.mode == "P" else "RGB"))
    raw = np.asarray(image)
    array = raw.astype(np.float32)
    if array.size == 0 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise UsageError(f"cannot read an image of shape {array.shape}; give a greyscale or colour image")
    if np.issubdtype(raw.dtype, np.integer) or array.max(initial=0.0) > 1.0:  # 8-bit (16-bit) -> [0, 1]
        array = array / (65535.0 if raw.dtype == np.uint16 else 255.0)
    if array.ndim == 3 and array.shape[2] == 4:  # composite on the background: alpha-weighted
        alpha = array[..., 3:]
        array = array[..., :3] * alpha + background * (1.0 - alpha)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return np.clip(array, 0.0, 1.0)


def to_digit(image, size: int = 8, margin: float = DIGIT_MARGIN) -> np.ndarray:
    """A drawing or photo of one digit as scikit-learn's digits are: white ink on black, (size, size)
    in [0, 1], the ink's box centred and scaled to fill the square.

    Greyscale; inverted when the background (the border's median) is light; cropped to the pixels
    with ink; padded to a square (plus ``margin`` of its side each way); area-averaged down to
    ``size``; scaled so the strongest ink is 1 (the training digits' strokes saturate at 16/16).
    """
    array = as_array(image, background=1.0)
    grey = array if array.ndim == 2 else array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    ink = 1.0 - grey if np.median(border) > 0.5 else grey
    rows, cols = np.flatnonzero((ink > INK_THRESHOLD).any(1)), np.flatnonzero((ink > INK_THRESHOLD).any(0))
    if rows.size == 0:
        raise UsageError("the image is blank: draw a digit (or upload one) first")
    crop = ink[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    h, w = crop.shape
    side = max(h, w) + 2 * round(max(h, w) * margin)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top: top + h, left: left + w] = crop
    from PIL import Image

    small = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BOX))
    return np.clip(small / max(float(small.max()), 1e-6), 0.0, 1.0).astype(np.float32)


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def expect(run: DemoRun, task: str) -> None:
    if run.task != task:
        article = "a" if task == "vision" else "an"
        raise UsageError(f"{run.name!r} is a {run.task!r} run; the {KINDS[task]} tab needs {article} {task} run")


# --- the page ---------------------------------------------------------------------------------------

def import_gradio():
    """Gradio, with telemetry off; a missing install is one sentence that says how to get it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported; Blocks gets it too
    try:
        import gradio
    except ImportError:
        raise UsageError("the demo needs Gradio, an optional extra: pip install 'mlpmixer[demo]'") from None
    return gradio


def build_demo(run_dirs: list[str | os.PathLike] | None = None):
    """A ``gradio.Blocks`` page with a tab per kind of run in ``run_dirs`` (default: the shipped runs)."""
    gr = import_gradio()
    opened = open_runs(run_dirs)
    by_kind: dict[str, dict[str, DemoRun]] = {}
    for run in opened:
        by_kind.setdefault(run.kind, {})[run.name] = run
    with gr.Blocks(title="mlpmixer demo", analytics_enabled=False) as page:
        gr.Markdown("## mlpmixer demo\nMLP-Mixer models running on this machine: "
                    + ", ".join(f"`{run.name}` ({run.task})" for run in opened) + ".")
        with gr.Tabs():
            for kind, tab in (("fill", fill_tab), ("generate", generate_tab), ("classify", classify_tab)):
                if kind in by_kind:
                    with gr.Tab(kind.capitalize(), id=kind, elem_id=f"tab-{kind}"):
                        tab(gr, by_kind[kind])
    return page


def shown(gr, fn):
    """``fn`` with bad input (any ValueError: UsageError, DataError, CheckpointError) as a message in
    the page instead of a traceback; a generator stays a generator, so that it streams."""
    import inspect

    def message(error: ValueError):
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return gr.Error(text, print_exception=False)  # the page shows it; no traceback on the console

    if inspect.isgeneratorfunction(fn):
        def streamed(*args):
            try:
                yield from fn(*args)
            except ValueError as e:
                raise message(e) from None
        return streamed

    def answered(*args):
        try:
            return fn(*args)
        except ValueError as e:
            raise message(e) from None
    return answered


def pick(gr, choices: dict[str, DemoRun], kind: str):
    """The run chooser of a tab (hidden when there is only one run of its kind)."""
    return gr.Dropdown(list(choices), value=next(iter(choices)), label=f"{kind} run", visible=len(choices) > 1,
                       elem_id=f"{kind}-run")


def fill_tab(gr, choices: dict[str, DemoRun]) -> None:
    run = pick(gr, choices, "fill")
    text = gr.Textbox(label="Text: write _ for each character to fill", elem_id="fill-input", lines=2,
                      value="To be, or not to b_, that is th_")
    top_k = gr.Slider(1, 10, value=3, step=1, label="candidates per blank")
    button = gr.Button("Fill", variant="primary", elem_id="fill-button")
    filled = gr.Textbox(label="Filled (most likely character in each blank)", elem_id="fill-output", interactive=False)
    table = gr.HTML(elem_id="fill-candidates")
    gr.Examples([["What light through yonder wind_w"], ["Now is the w_nter of our"], ["My kingdom for a h_rse!"]],
                [text])  # each within one window of seq_len (32) characters: the blanks see all their context
    answer = shown(gr, lambda name, t, k: fill_table(choices[name], t, int(k)))
    button.click(answer, [run, text, top_k], [filled, table])
    text.submit(answer, [run, text, top_k], [filled, table])


def generate_tab(gr, choices: dict[str, DemoRun]) -> None:
    run = pick(gr, choices, "generate")
    prompt = gr.Textbox(label="Prompt", value="ROMEO:\n", lines=2, elem_id="generate-input")
    with gr.Row():
        length = gr.Slider(1, 1000, value=200, step=1, label="characters to generate")
        temperature = gr.Slider(0.1, 2.0, value=0.8, step=0.05, label="temperature (lower: more conservative)")
        top_k = gr.Slider(0, 20, value=0, step=1, label="top-k (0: every character)")
        seed = gr.Number(0, precision=0, label="seed (-1: a new sample each time)")
    button = gr.Button("Generate", variant="primary", elem_id="generate-button")
    out = gr.Textbox(label="Text", lines=12, elem_id="generate-output", interactive=False)

    def stream(name, text, n, t, k, s):
        yield from generate_text(choices[name], text, int(n), float(t), int(k), None if s is None else int(s))
    button.click(shown(gr, stream), [run, prompt, length, temperature, top_k, seed], [out])


def classify_tab(gr, choices: dict[str, DemoRun]) -> None:
    run = pick(gr, choices, "classify")
    with gr.Row():
        with gr.Column():
            with gr.Tabs():
                with gr.Tab("Draw", id="draw"):
                    sketch = gr.Sketchpad(label="Draw a digit (pick the brush first)", type="numpy", image_mode="RGBA", canvas_size=(280, 280),
                                          fixed_canvas=True, layers=False, transforms=(), elem_id="classify-sketch",
                                          brush=gr.Brush(colors=["#000000"], default_color="#000000",
                                                         default_size=12, color_mode="fixed"))
                    draw_button = gr.Button("Classify the drawing", variant="primary", elem_id="classify-draw-button")
                with gr.Tab("Upload", id="upload"):
                    upload = gr.File(label="Image file (PNG, JPEG, ...)", type="filepath", file_types=["image"],
                                     elem_id="classify-upload")
        with gr.Column():
            label = gr.Label(num_top_classes=5, label="Top-5 classes", elem_id="classify-label")
            seen = gr.Image(label="What the model sees", interactive=False, height=200, elem_id="classify-seen")

    def answer(name, image):
        if isinstance(image, dict):  # the sketchpad: background, layers, composite
            image = image.get("composite")
        top, array = classify(choices[name], image)
        scale = max(1, 160 // max(array.shape[:2]))  # nearest-neighbour zoom: 8x8 pixels stay visible
        return top, (np.kron(array, np.ones((scale, scale) + (1,) * (array.ndim - 2))) * 255).astype(np.uint8)
    draw_button.click(shown(gr, answer), [run, sketch], [label, seen])
    upload.upload(shown(gr, answer), [run, upload], [label, seen])


def serve(run_dirs: list[str | os.PathLike] | None = None, host: str = "127.0.0.1", port: int = 7860,
          block: bool = True):
    """Build the page and serve it at http://host:port until Ctrl-C, which stops the server and goes
    on as a KeyboardInterrupt (the CLI's exit 130). ``block=False``: return the running page at once;
    stop it with ``.close()``."""
    page = build_demo(run_dirs)
    try:
        page.queue().launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                            prevent_thread_lock=True, quiet=True, show_error=True)
    except OSError as e:
        if "port" in str(e).lower():
            raise UsageError(f"cannot serve on {host}:{port}: the port is in use or not allowed; choose another "
                             f"with --port") from None
        raise
    if not block:
        return page
    print(f"mlpmixer demo: http://{host}:{port} (Ctrl-C stops it)", flush=True)
    try:
        while page.is_running:
            time.sleep(0.2)
    finally:
        page.close()
    return page


def add_demo_command(commands) -> None:
    """``mlpmixer demo [RUN ...] [--port N] [--host H]`` on the CLI's subcommands."""
    demo = commands.add_parser(
        "demo", help="open a local demo page: fill blanks, generate text, classify a drawn digit",
        description="Serve a local demo page (Gradio; pip install 'mlpmixer[demo]') with a tab per kind of run: "
                    "fill (mlm), generate (lm), classify (vision). Without RUN, the shipped runs: "
                    f"{', '.join(pretrained.names())}. Nothing is sent anywhere; Ctrl-C stops it.")
    demo.add_argument("runs", metavar="RUN", nargs="*", help=pretrained.help_text())
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=int, default=7860, help="port to listen on")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    serve(args.runs or None, host=args.host, port=args.port)
    return 0
