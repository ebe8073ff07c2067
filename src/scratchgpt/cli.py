"""The `scratchgpt` command: train, sft, chat, sample, eval, bench, serve, presets, export, import, plot.

Every config field becomes a flag (`n_layer` -> `--n-layer`), so a preset is a starting point
and anything in it can be changed from the command line. Errors the user can fix are printed
as one line on stderr with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .config import (
    FIELD_HELP,
    FREE_MODEL_FIELDS,
    SECTIONS,
    config_from_preset,
    load_preset,
    preset_names,
)
from .device import governed, threads_now
from .errors import ScratchGPTError
from .plot import X_AXES
from .serving.scheduler import DEFAULT_MAX_WAITING, DEFAULT_REQUEST_TIMEOUT, DEFAULT_SLOTS
from .speed.allocator import keep_freed_memory
from .version import __version__

# Flags whose names differ from the config field they set, and fields with no flag.
FLAG_NAMES = {("train", "learning_rate"): "--lr", ("data", "path"): "--data"}
NO_FLAG = {("model", "vocab_size")}

TRAIN_EXAMPLES = """examples:
  scratchgpt train --preset cpu-baby --out runs/baby
  scratchgpt train --preset cpu-baby --data my_text.txt --max-steps 500 --out runs/mine
  scratchgpt train --preset bigram --out runs/bigram
  scratchgpt train --data notes/ --tokenizer bpe --vocab-size 2048 --out runs/notes   # every text file under notes/
  scratchgpt train --data 'books/**/*.txt' --tokenizer byte --skip-bad-files --out runs/books
  scratchgpt train --data old_latin1.txt --encoding latin-1 --out runs/old
  scratchgpt train --resume runs/baby --max-steps 4000      # continue a run, here for longer
  scratchgpt train --init-from runs/gpt2 --data my_text.txt --lr 3e-5 --min-lr 3e-6 --out runs/tuned   # fine-tune
"""
SAMPLE_EXAMPLES = """examples:
  scratchgpt sample --checkpoint runs/baby --prompt "ROMEO:" --max-new-tokens 500
  scratchgpt sample --checkpoint runs/baby --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1
  scratchgpt sample --checkpoint runs/baby/last --temperature 0     # greedy
  scratchgpt sample --checkpoint runs/baby --num-samples 4 --stop $'\\n\\n' --repetition-penalty 1.2
  scratchgpt sample --checkpoint runs/baby --temperature 0 --no-kv-cache   # the slow reference path, same text
"""
SFT_EXAMPLES = """examples:
  scratchgpt sft --checkpoint runs/cpu-baby --out runs/chat        # the built-in set, offline
  scratchgpt sft --checkpoint runs/cpu-baby --data chats.jsonl --out runs/mine
  scratchgpt sft --checkpoint runs/gpt2 --data chats/ --lora-rank 8 --lr 1e-3 --out runs/gpt2-chat   # LoRA
  scratchgpt sft --resume runs/chat --max-steps 2000               # continue a fine-tuning run
"""
CHAT_EXAMPLES = """examples:
  scratchgpt chat --checkpoint runs/chat
  scratchgpt chat --checkpoint runs/chat --system "Answer briefly." --temperature 0.7 --seed 1
  echo "Spell horse backwards." | scratchgpt chat --checkpoint runs/chat --temperature 0
"""
EVAL_EXAMPLES = """examples:
  scratchgpt eval --checkpoint runs/baby
  scratchgpt eval --checkpoint runs/baby --data my_text.txt --json
  scratchgpt eval --checkpoint runs/notes-bpe --data notes/     # compare tokenizers by val_bpc (bits per character)
"""


MAIN_EXAMPLES = """examples:
  scratchgpt train --preset cpu-baby --out runs/baby
  scratchgpt sample --checkpoint runs/baby --prompt "ROMEO:"
  scratchgpt sft --checkpoint runs/baby --out runs/chat     # teach it to answer
  scratchgpt chat --checkpoint runs/chat                    # and talk to it
  scratchgpt eval --checkpoint runs/baby
  scratchgpt plot runs/baby runs/big --out compare.png     # loss curves of two runs in one figure
  scratchgpt COMMAND --help      # each command's options and examples
"""
PRESETS_EXAMPLES = """examples:
  scratchgpt presets
  scratchgpt train --preset shakespeare-char --out runs/big      # train one of them
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look for help, and subcommands are listed."""

    def __init__(self, *args, **kwargs):
        self.subcommands: dict[str, _Parser] = {}  # name -> parser, filled by add_subparsers(...).add_parser
        self.subcommand_dest: str | None = None
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        self.subcommands, self.subcommand_dest = action.choices, kwargs.get("dest")
        return action

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """Unknown arguments are reported by the command that was given them, so its own --help is named."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.chosen(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def chosen(self, args: argparse.Namespace) -> _Parser:
        """The innermost (sub)command parser that `args` went through, such as that of `scratchgpt bench train`."""
        name = getattr(args, self.subcommand_dest, None) if self.subcommand_dest else None
        return self.subcommands[name].chosen(args) if name in self.subcommands else self


def _field_type(annotation: Any) -> type:
    """The flag type of a config field (its annotation is a string under postponed evaluation)."""
    return {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, annotation)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings (override the preset)")
        for field in dataclasses.fields(cls):
            if (section, field.name) in NO_FLAG:
                continue
            flag = FLAG_NAMES.get((section, field.name), "--" + field.name.replace("_", "-"))
            dest = f"{section}.{field.name}"
            kind = _field_type(field.type)
            help_text = _flag_help(FIELD_HELP[section][field.name], field.default)
            if kind is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                group.add_argument(flag, dest=dest, type=kind, default=None, metavar=field.name.upper(), help=help_text)


def _flag_help(what: str, default: Any) -> str:
    """'transformer blocks stacked (preset's value; default 4)': the default is not repeated when `what` names it."""
    note = "preset's value" if "(default)" in what else f"preset's value; default {default!r}"
    return f"{what} ({note})"


def _add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where the model runs: auto picks cuda, then mps, then cpu (default auto)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for PyTorch's kernels; 0 (default): follow the cores other programs leave free")


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, name = dest.split(".", 1)
            out[section][name] = value
    return out


def _add_sampling_flags(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 means greedy, always the most likely token (default {temperature})")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only among the most likely tokens whose probability adds up to p")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")


def _add_sample_parser(commands) -> None:
    p = commands.add_parser("sample", help="generate text from a checkpoint", epilog=SAMPLE_EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Continue a prompt with a trained model, streaming characters as they are generated.")
    p.add_argument("--checkpoint", required=True, help="a run directory (uses best/, else last/) or a checkpoint directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per sample, at least 1 (default 500)")
    _add_sampling_flags(p, temperature=1.0)
    p.add_argument("--num-samples", type=int, default=1, help="continuations decoded together in one batch (the first streams)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 makes tokens already in the text less likely")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample where TEXT appears (not included); repeatable; in bash $'\\n' is a newline")
    p.add_argument("--no-kv-cache", action="store_true", help="full forward pass per token: the slow reference path")
    p.add_argument("--compile", action="store_true",
                   help="run each decoding step as one compiled program: tens of seconds to compile the first time "
                        "(then cached on disk), faster for long outputs")
    _add_device_flags(p)


def _add_chat_parsers(commands) -> None:
    p = commands.add_parser("sft", help="fine-tune a trained model to answer: supervised fine-tuning on conversations",
                            epilog=SFT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Teach a trained model to answer: train it on conversations (JSONL, "
                                        "{\"messages\": [...]} per line) with the loss on the assistant's replies only. "
                                        "Without --data, a built-in set made from Tiny Shakespeare. The base is never modified.")
    p.add_argument("--checkpoint", help="the trained model to start from: a run directory or a checkpoint directory")
    p.add_argument("--out", help="run directory for the fine-tuned checkpoints and logs (default runs/chat)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the fine-tuning run in RUN_DIR from its last/ checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out instead of refusing")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(p)
    p = commands.add_parser("chat", help="talk to a fine-tuned model in the terminal", epilog=CHAT_EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="A conversation with a chat model (from `scratchgpt sft`): type a message, read "
                                        "the reply as it is written. The oldest turns leave when the context is full. "
                                        "Ctrl-D or Ctrl-C leaves; /reset starts over.")
    p.add_argument("--checkpoint", required=True, help="a fine-tuned run directory (uses best/, else last/) or checkpoint")
    p.add_argument("--system", default="", help="a system message that opens the conversation")
    p.add_argument("--max-new-tokens", type=int, default=200, help="longest reply, in tokens (default 200; the context may allow fewer)")
    _add_sampling_flags(p, temperature=0.8)
    _add_device_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scratchgpt", description="A GPT built from scratch: train it on text, then sample from it.",
                     epilog=MAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"scratchgpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    p = commands.add_parser("train", help="train a model", epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Train a model on Tiny Shakespeare (shipped with the package) or on --data PATH.")
    p.add_argument("--preset", help=f"starting config: one of {preset_names()} or a .json file (default cpu-baby)")
    p.add_argument("--out", help="run directory for checkpoints and logs (default runs/PRESET)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last/ checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out instead of refusing")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(p)

    _add_sample_parser(commands)
    _add_chat_parsers(commands)

    p = commands.add_parser("eval", help="loss on the whole validation split", epilog=EVAL_EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Mean cross-entropy over every position of the validation split, in consecutive "
                                        "windows of block_size, with perplexity, and bits per character and per byte, "
                                        "which compare models with different tokenizers.")
    p.add_argument("--checkpoint", required=True, help="a run directory (uses best/, else last/) or a checkpoint directory")
    p.add_argument("--data", help="text to evaluate on: a file, a directory or a glob (default: the checkpoint's training text)")
    p.add_argument("--encoding", help="the text's encoding (default: the checkpoint's, normally utf-8)")
    p.add_argument("--skip-bad-files", action="store_true", default=None, help="leave out files that are not text")
    p.add_argument("--batch-size", type=int, default=32, help="windows scored at once; only speed and memory change (default 32)")
    _add_device_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    _add_bench_parser(commands)
    _add_serve_parser(commands)

    commands.add_parser("presets", help="list the presets", description="List the presets shipped with scratchgpt.",
                        epilog=PRESETS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_interop_parsers(commands)
    _add_plot_parser(commands)
    return parser


PLOT_EXAMPLES = """examples:
  scratchgpt plot runs/baby                                 # draw runs/baby/loss.png again
  scratchgpt plot runs/baby runs/big --out compare.png      # val loss of both runs in one figure
  scratchgpt plot runs/adamw runs/muon --x time --labels AdamW Muon --out optimizers.svg
"""


def _add_plot_parser(commands) -> None:
    p = commands.add_parser("plot", help="draw a run's loss curves, or compare several runs", epilog=PLOT_EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="From a run's metrics.jsonl, draw the train loss per logged step, the train and "
                                        "val estimates at each evaluation and the learning rate (what train writes to "
                                        "loss.png). Given several runs, overlay their val estimates and faint per-step "
                                        "train losses, one colour per run.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run directory written by scratchgpt train --out")
    p.add_argument("--out", metavar="FILE", help="the image to write, its suffix picking the format (.png, .svg, .pdf); "
                                                 "default RUN/loss.png for one run, comparison.png in the current "
                                                 "directory for several")
    p.add_argument("--x", default="step", choices=X_AXES,
                   help="the x axis: optimizer steps, tokens seen, or elapsed seconds (time: evaluations only, "
                        "as per-step rows carry no time) (default step)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="legend names, one per RUN, given after the runs "
                                                                "(default: the directory names)")


BENCH_EXAMPLES = """examples:
  scratchgpt bench train --preset cpu-baby
  scratchgpt bench train --help      # its options
"""
BENCH_TRAIN_EXAMPLES = """examples:
  scratchgpt bench train --preset cpu-baby --json
  scratchgpt bench train --preset cpu-baby --compile --steps 60     # measure a setting against fp32 eager
"""


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="measure speed", description="Measure training or sampling speed.",
                                epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = bench.add_subparsers(dest="bench_command", required=True, parser_class=_Parser, metavar="WHAT")
    p = kinds.add_parser("train", help="tokens/s of complete training steps, against fp32 eager in the same run",
                         epilog=BENCH_TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Median tokens/s of complete training steps (batch, forward, backward, clipping, "
                                     "optimizer) after warm-up, for the preset as configured and for the plain path of the "
                                     "same model (float32, eager, PyTorch's fused attention and default AdamW: the "
                                     "classic recipe), timed in alternating blocks.")
    p.add_argument("--preset", default="cpu-baby", help=f"one of {preset_names()} or a .json file (default cpu-baby)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per path (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per path first (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_flags(p)
    _add_bench_sample_parser(kinds)


BENCH_SAMPLE_EXAMPLES = """examples:
  scratchgpt bench sample --checkpoint runs/baby --json
  scratchgpt bench sample --checkpoint runs/big --max-new-tokens 300
"""


def _add_bench_sample_parser(kinds) -> None:
    p = kinds.add_parser("sample", help="tokens/s of generation with and without the KV cache",
                         epilog=BENCH_SAMPLE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Greedy tokens/s of the KV-cached path and of the naive path (a full forward pass "
                                     "per token) for the same checkpoint and prompt, stepped in alternating blocks in one "
                                     "run, and whether both produced the same text.")
    p.add_argument("--checkpoint", required=True, help="a run directory (uses best/, else last/) or a checkpoint directory")
    p.add_argument("--max-new-tokens", type=int, default=1000, help="tokens generated by each path (default 1000)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    _add_device_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


SERVE_EXAMPLES = """examples:
  scratchgpt serve --checkpoint runs/baby                      # then open http://127.0.0.1:8000/
  scratchgpt serve --checkpoint runs/baby --host 0.0.0.0 --port 9000 --max-tokens-cap 500
  read -s SCRATCHGPT_API_KEY && export SCRATCHGPT_API_KEY    # a classroom: clients need the key
  scratchgpt serve --checkpoint runs/baby --host 0.0.0.0
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "ROMEO:", "max_tokens": 100, "temperature": 0.8, "seed": 1}'
"""


def _add_serve_parser(commands) -> None:
    p = commands.add_parser("serve", help="serve a checkpoint over HTTP, with a web playground", epilog=SERVE_EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="An OpenAI-compatible /v1/completions endpoint (streaming, logprobs, stop, n, seed), "
                                        "GET /health, and a playground page at /. Needs the serve extra: "
                                        "pip install 'scratchgpt[serve]'.")
    p.add_argument("--checkpoint", required=True, help="a run directory (uses best/, else last/) or a checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="refuse requests for more new tokens than this (default 2048)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SCRATCHGPT_API_KEY, which keeps the "
                        "key out of shell history; neither: no key). / and /health stay open")
    p.add_argument("--api-key-file", metavar="PATH",
                   help="a file of keys, one per line (blank lines and # comments ignored), any of which opens /v1/*; "
                        "with --api-key or $SCRATCHGPT_API_KEY, that key works too")
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN",
                   help="let browser pages from ORIGIN (e.g. https://class.example.org) call the API (CORS); repeatable")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM); needs --ssl-keyfile")
    p.add_argument("--ssl-keyfile", help="the certificate's private key (PEM); needs --ssl-certfile")
    p.add_argument("--max-connections", type=int, default=256,
                   help="connections served at once; beyond them new ones get a 503 (default 256)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="close a connection whose request line and headers take longer than this many seconds to arrive "
                        "(a slow-header client cannot hold a connection for longer; default 10)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000,
                   help="refuse a request body larger than this with a 413 (default 1000000)")
    p.add_argument("--max-prompt-tokens", type=int, default=8192,
                   help="refuse a prompt of more tokens than this with a 400 (default 8192)")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C, let running requests finish for up to this long, then exit (default 30)")
    p.add_argument("--slots", type=int, default=DEFAULT_SLOTS,
                   help="samples generated at once, in one forward pass per token; each request's n takes n of them (default %(default)s)")
    p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help="requests that may wait for a free slot; beyond them the server answers 429 (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                   help="seconds a request may generate before it is ended with finish_reason length (default %(default)g)")
    p.add_argument("--in-process", action="store_true",
                   help="run the model in the server's own process instead of a second one (they then share one "
                        "Python interpreter lock: slower with many clients, one process less)")
    p.add_argument("--compile", action="store_true",
                   help="run each decoding step as one compiled program (built once per model shape, tens of seconds, "
                        "then loaded from disk): faster tokens, a slower first start")
    _add_device_flags(p)


EXPORT_EXAMPLES = """examples:
  scratchgpt export --checkpoint runs/baby --format hf --out hf/baby
  python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('hf/baby')"
  scratchgpt export --checkpoint runs/baby --format gguf --out gguf/baby.gguf      # for llama.cpp, Ollama, LM Studio
  scratchgpt export --checkpoint runs/big --format gguf --dtype q8_0 --out gguf/big-q8.gguf
  ollama create baby -f gguf/baby.Modelfile && ollama run baby "ROMEO:"
"""
IMPORT_EXAMPLES = """examples:
  scratchgpt import --format hf --from hf/baby --out runs/baby-again
  scratchgpt import --format hf --from ~/models/gpt2 --out runs/gpt2      # a GPT-2 directory on disk
  scratchgpt import --format hf --from weights/ --tokenizer runs/baby/best/tokenizer.json --out runs/mine
  scratchgpt train --init-from runs/gpt2 --data my_text.txt --lr 3e-5 --min-lr 3e-6 --out runs/tuned   # then fine-tune
"""


def _add_interop_parsers(commands) -> None:
    p = commands.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 directory or a GGUF file",
                            epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Write a checkpoint as a directory that transformers' GPT2LMHeadModel.from_pretrained "
                                        "loads with the same logits (--format hf), or as a GGUF file that llama.cpp, Ollama "
                                        "and LM Studio run, with an Ollama Modelfile beside it (--format gguf, needs "
                                        "pip install 'scratchgpt[gguf]'). Only the classic GPT-2 architecture exports.")
    p.add_argument("--checkpoint", required=True, help="a run directory (uses best/, else last/) or a checkpoint directory")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: Hugging Face transformers GPT-2 (default); gguf: one file for llama.cpp")
    p.add_argument("--out", required=True, help="hf: the directory to write (new or empty); gguf: the .gguf file to write")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"],
                   help="gguf only: how the weight matrices are stored (default f32; f16 halves the file, q8_0 quarters it)")
    p.add_argument("--overwrite", action="store_true", help="replace what is already in --out")

    p = commands.add_parser("import", help="make a checkpoint from a Hugging Face GPT-2 directory", epilog=IMPORT_EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Convert a GPT2LMHeadModel directory (config.json with model.safetensors or "
                                        "pytorch_model.bin) into a scratchgpt checkpoint for sample, eval and train --init-from.")
    p.add_argument("--format", default="hf", choices=["hf"], help="hf: Hugging Face transformers GPT-2 (default)")
    p.add_argument("--from", dest="source", required=True, metavar="DIR", help="the Hugging Face model directory")
    p.add_argument("--out", required=True, help="the checkpoint directory to write (must be new or empty)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="the vocabulary, when DIR has none: a scratchgpt tokenizer.json or checkpoint, or an HF tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace what is already in --out")


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return _export_gguf(args)
    if args.dtype != "f32":
        raise ScratchGPTError("--dtype applies to --format gguf only; a Hugging Face export keeps float32 weights")
    from .interop.hf import export_hf

    result = export_hf(args.checkpoint, args.out, overwrite=args.overwrite)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.out_dir}: config.json, model.safetensors, {', '.join(result.tokenizer_files + ['README.md'])}")
    print(f"load it: GPT2LMHeadModel.from_pretrained({str(result.out_dir)!r}) (pip install 'scratchgpt[hf]')")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from .interop.gguf import export_gguf

    result = export_gguf(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.path} ({result.n_bytes / 1e6:.1f} MB, {result.dtype}) and {result.modelfile}")
    print(f"run it: ollama create NAME -f {result.modelfile} && ollama run NAME, or load {result.path} in LM Studio or llama.cpp")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .interop.hf import import_hf

    out = import_hf(args.source, args.out, tokenizer_path=args.tokenizer, overwrite=args.overwrite)
    print(f"wrote checkpoint {out}")
    print(f"sample from it: scratchgpt sample --checkpoint {out}")
    print(f"fine-tune it:   scratchgpt train --init-from {out} --data TEXT --lr 3e-5 --min-lr 3e-6 --out RUN_DIR")
    return 0


# ---------------------------------------------------------------------------------------------


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    known = ("best", "last", "metrics.jsonl", "samples.txt", "loss.png")
    existing = [name for name in known if (out / name).exists()] + sorted(p.name for p in out.glob("step-*"))
    if not existing:
        return
    if not overwrite:
        raise ScratchGPTError(
            f"{out} already holds a run ({', '.join(existing[:3])}); continue it with --resume {out}, "
            "choose another --out, or pass --overwrite to replace it"
        )
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _process_start() -> float:
    """The `time.perf_counter()` value at which this process started (Linux), else now.

    A --time-budget then covers Python's and torch's import time too, as a stopwatch would.
    """
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.perf_counter() - max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


def _check_init_from(args: argparse.Namespace, overrides: dict[str, dict[str, Any]]) -> None:
    """--init-from takes the model's shape from its checkpoint: refuse flags that would change it."""
    init_from = overrides["train"].get("init_from")
    if not init_from:
        return
    if args.resume:
        raise ScratchGPTError("--init-from starts a new run from a checkpoint's weights; --resume continues a run: use one")
    shape = sorted(name for name in overrides["model"] if name not in FREE_MODEL_FIELDS)
    if shape:
        flag = "--" + shape[0].replace("_", "-")
        raise ScratchGPTError(f"{flag} cannot be combined with --init-from: the model's shape comes from {init_from} "
                              "(only --dropout and --attention may change)")


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import launched_as_main
    from .train import resume_config, train

    overrides = _overrides(args)
    _check_init_from(args, overrides)
    if args.resume:
        if args.preset:
            raise ScratchGPTError("--preset cannot be combined with --resume: the run keeps its own config (override single fields instead)")
        out = Path(args.resume)
        config = resume_config(out, overrides)
    else:
        preset = args.preset or "cpu-baby"
        config = config_from_preset(preset, overrides)
        out = Path(args.out or f"runs/{Path(preset).stem}")
        _prepare_out_dir(out, args.overwrite)
    result = train(config, out, resume=bool(args.resume), progress=not args.no_progress, started_at=_process_start())
    if not launched_as_main():  # under torchrun, rank 0 alone reports
        return 130 if result.interrupted else 0
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        verb = "stopped" if result.interrupted else "done"
        print(f"{verb}: {result.steps} steps in {result.elapsed_seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s); "
              + (f"full val loss {result.full_val_loss:.4f} ({result.full_val_bpc:.3f} bits/char); " if not math.isnan(result.full_val_loss) else "")
              + f"checkpoints in {out}")
        print(f"sample from it: scratchgpt sample --checkpoint {out}")
    return 130 if result.interrupted else 0


def cmd_sft(args: argparse.Namespace) -> int:
    from .chat.sft import check_out, sft, sft_config
    from .distributed import launched_as_main
    from .train import resume_config

    overrides = _overrides(args)
    shape = sorted(name for name in overrides["model"] if name not in FREE_MODEL_FIELDS)
    if shape:
        raise ScratchGPTError(f"--{shape[0].replace('_', '-')} cannot be used with sft: the model's shape comes from its checkpoint")
    if args.resume:
        if args.checkpoint:
            raise ScratchGPTError("--checkpoint starts a new fine-tuning run; --resume continues one: use one")
        out = Path(args.resume)
        config = resume_config(out, overrides)
    else:
        if not args.checkpoint:
            raise ScratchGPTError("sft needs --checkpoint: the trained model to fine-tune (for example runs/cpu-baby)")
        config = sft_config(args.checkpoint, overrides)
        out = Path(args.out or "runs/chat")
        check_out(args.checkpoint, out)
        _prepare_out_dir(out, args.overwrite)
    result = sft(config, out, resume=bool(args.resume), progress=not args.no_progress, started_at=_process_start())
    if not launched_as_main():  # under torchrun, rank 0 alone reports
        return 130 if result.train.interrupted else 0
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        verb = "stopped" if result.train.interrupted else "done"
        print(f"{verb}: {result.train.steps} steps in {result.train.elapsed_seconds:.1f} s; checkpoints in {out}")
        print(f"talk to it: scratchgpt chat --checkpoint {out}")
    return 130 if result.train.interrupted else 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat.template import Message, is_chat_tokenizer
    from .checkpoint import load_checkpoint
    from .device import resolve_device
    from .inference.engine import SamplingSettings

    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed)
    settings.validate(SAMPLE_FLAGS)
    model, tokenizer, _, _ = load_checkpoint(args.checkpoint, resolve_device(args.device))
    if not is_chat_tokenizer(tokenizer):
        raise ScratchGPTError(f"{args.checkpoint} is not a chat model (its tokenizer has no role tokens); fine-tune it "
                              f"first: scratchgpt sft --checkpoint {args.checkpoint} --out runs/chat")
    opening = [Message("system", args.system)] if args.system else []
    tokenizer.encode(args.system)  # refuse an unknown character before the conversation starts
    print(f"talking to {args.checkpoint}: type a message; Ctrl-D or Ctrl-C leaves, /reset starts over", file=sys.stderr)
    try:
        _converse(model, tokenizer, opening, settings)
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
    return 0


def _converse(model, tokenizer, opening, settings) -> None:
    """Read a line, print the reply as it comes, keep the history; until EOFError or KeyboardInterrupt."""
    import torch

    from .chat.talk import stream_reply
    from .chat.template import Message

    history = list(opening)
    while True:
        line = input("you> ")
        if line.strip() == "/reset":
            history = list(opening)
            continue
        if not line.strip():
            continue
        try:
            tokenizer.encode(line)
        except ScratchGPTError as exc:
            print(f"scratchgpt chat: {exc}", file=sys.stderr)
            continue
        history.append(Message("user", line))
        try:
            steps = stream_reply(model, tokenizer, history, settings, trim=True)
        except ScratchGPTError as exc:  # a message longer than the context: said, and the conversation goes on
            print(f"scratchgpt chat: {exc}", file=sys.stderr)
            history.pop()
            continue
        sys.stdout.write("model> ")
        reply = []
        with torch.inference_mode():  # held for the whole reply, so that no step enters it again (engine.py)
            for chunks in steps:
                for chunk in chunks:
                    reply.append(chunk.text)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
        sys.stdout.write("\n")
        history.append(Message("assistant", "".join(reply)))
        if settings.seed is not None:  # the next reply draws on, rather than repeating this one's draws
            settings.seed += 1


SAMPLE_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
                "repetition_penalty": "--repetition-penalty", "num_samples": "--num-samples", "stop": "--stop",
                "seed": "--seed"}


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_checkpoint
    from .device import resolve_device
    from .inference.engine import SamplingSettings
    from .sample import stream_completion

    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop, num_samples=args.num_samples, seed=args.seed,
        use_cache=not args.no_kv_cache,
    )
    settings.validate(SAMPLE_FLAGS)
    if not args.prompt:
        raise ScratchGPTError("--prompt must not be empty (the default is a newline)")
    device = resolve_device(args.device)
    model, tokenizer, _, _ = load_checkpoint(args.checkpoint, device)
    tokenizer.encode(args.prompt)  # refuse an unknown character before anything is printed
    # The samples are decoded together in one batch: the first streams, the others print at the end.
    others: list[list[str]] = [[] for _ in range(args.num_samples)]
    sys.stdout.write(args.prompt)
    with torch.inference_mode():  # held for the whole loop, so that no step enters it again (engine.py)
        for chunks in stream_completion(model, tokenizer, args.prompt, settings, compile=args.compile):
            for chunk in chunks:
                if chunk.index == 0:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                else:
                    others[chunk.index].append(chunk.text)
    for texts in others[1:]:
        sys.stdout.write("\n---\n" + args.prompt + "".join(texts))
    sys.stdout.write("\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .data import dataset_from_config
    from .device import resolve_device
    from .evaluate import evaluate_split

    if args.batch_size < 1:
        raise ScratchGPTError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    model, tokenizer, config, _ = load_checkpoint(args.checkpoint, device)
    if args.data is None and config.data.path:  # the checkpoint names its training text: say so
        if not Path(config.data.path).exists():
            raise ScratchGPTError(f"the checkpoint was trained on {config.data.path}, which is not here; pass --data PATH "
                                  "with the text to evaluate on")
        print(f"evaluating on {config.data.path} (the checkpoint's training text; --data PATH for another)",
              file=sys.stderr)
    data_config = dataclasses.replace(config.data, path=args.data or config.data.path,
                                      encoding=args.encoding or config.data.encoding,
                                      skip_bad_files=args.skip_bad_files or config.data.skip_bad_files)
    if config.data.chat:  # a fine-tuned chat model: the loss on its held-out conversations' replies
        from .chat.data import chat_data_from_config

        chats = chat_data_from_config(data_config, tokenizer, config.model.block_size, log=_note)
        _note(f"evaluating on the {len(chats.val):,} validation conversations of {chats.source}: the loss on the replies")
        result, source = chats.evaluate(model, device, batch_size=args.batch_size, progress=not args.json), "the replies"
    else:
        data = dataset_from_config(data_config, tokenizer=tokenizer, block_size=1)
        result = evaluate_split(model, data.val_ids, data.val_target_chars, batch_size=args.batch_size, device=device,
                                n_bytes=data.val_target_bytes, progress=not args.json)  # a bar once it lasts 2 s
        source = data.source
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"val loss {result.val_loss:.4f} per token | perplexity {result.val_perplexity:.3f} | "
              f"{result.val_bpc:.4f} bits/char | {result.val_bpb:.4f} bits/byte | {result.val_tokens:,} {tokenizer.kind} "
              f"tokens, {result.val_chars:,} characters of {source}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .speed.bench import bench_train

    if args.bench_command == "sample":
        return cmd_bench_sample(args)
    if args.steps < 1 or args.warmup < 0:
        raise ScratchGPTError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    config = config_from_preset(args.preset, _overrides(args))
    result = bench_train(config, steps=args.steps, warmup=args.warmup)
    if args.json:
        print(json.dumps(result))
    else:
        st = result["settings"]
        print(f"{args.preset}: {result['tokens_per_second']:,.0f} tokens/s ({result['ms_per_step']:.1f} ms/step, "
              f"autocast {st['autocast']}, compile {st['compile']}) vs the plain fp32 eager path "
              f"{result['baseline_tokens_per_second']:,.0f} "
              f"tokens/s: {result['speedup']:.2f}x")
        if st["dtype_choice"].startswith(("float32:", "bfloat16:")):
            print(f"--dtype auto chose {st['dtype_choice']}")
    return 0


def cmd_bench_sample(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .device import resolve_device
    from .speed.bench import bench_sample

    if args.max_new_tokens < 1:
        raise ScratchGPTError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise ScratchGPTError("--prompt must not be empty (the default is a newline)")
    model, tokenizer, _, _ = load_checkpoint(args.checkpoint, resolve_device(args.device))
    with governed(threads_now(args.threads)):  # fixed for the measurement, so that both paths compare
        result = bench_sample(model, tokenizer.encode(args.prompt), args.max_new_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.max_new_tokens} greedy tokens: KV cache {result['cached_tokens_per_second']:,.1f} tokens/s, "
              f"naive {result['naive_tokens_per_second']:,.1f} tokens/s: {result['speedup']:.1f}x "
              f"({'same' if result['identical_text'] else 'DIFFERENT'} text)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serving.server import BatchingLimits, serve
    except ImportError as exc:
        raise ScratchGPTError(f"the server needs the serve extra ({exc.name} is missing): pip install 'scratchgpt[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise ScratchGPTError(f"--port must be in 0..65535, got {args.port}")
    if args.max_tokens_cap < 1:
        raise ScratchGPTError(f"--max-tokens-cap must be >= 1, got {args.max_tokens_cap}")
    for flag, value in (("--max-body-bytes", args.max_body_bytes), ("--max-prompt-tokens", args.max_prompt_tokens)):
        if value < 1:
            raise ScratchGPTError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.drain_seconds < math.inf:
        raise ScratchGPTError(f"--drain-seconds must be a number >= 0, got {args.drain_seconds}")
    api_key, source = (args.api_key, "--api-key") if args.api_key is not None \
        else (os.environ.get("SCRATCHGPT_API_KEY"), "SCRATCHGPT_API_KEY")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable() and api_key and " " not in api_key):
        raise ScratchGPTError(f"{source} must be a non-empty key of printable ASCII characters without spaces "
                              "(clients send it in the header 'Authorization: Bearer KEY')")
    keys = ([api_key] if api_key is not None else []) + _keys_from_file(args.api_key_file)
    for flag, value, least in (("--slots", args.slots, 1), ("--max-waiting", args.max_waiting, 0),
                               ("--max-connections", args.max_connections, 1)):
        if value < least:
            raise ScratchGPTError(f"{flag} must be >= {least}, got {value}")
    tls = _tls_files(args.ssl_certfile, args.ssl_keyfile)
    if not 0 < args.header_timeout < math.inf:
        raise ScratchGPTError(f"--header-timeout must be a number of seconds > 0, got {args.header_timeout}")
    if not 0 < args.request_timeout < math.inf:
        raise ScratchGPTError(f"--request-timeout must be a number of seconds > 0, got {args.request_timeout}")
    batching = BatchingLimits(args.slots, args.max_waiting, args.request_timeout, own_process=not args.in_process,
                              compile=args.compile)
    serve(args.checkpoint, args.host, args.port, args.max_tokens_cap, args.device, api_key=keys,
          max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens, drain_seconds=args.drain_seconds,
          batching=batching, allowed_origins=args.allowed_origins, tls=tls, max_connections=args.max_connections,
          header_timeout=args.header_timeout)
    return 0


def _keys_from_file(path: str | None) -> list[str]:
    """The keys of --api-key-file, one per line, each checked as a key is."""
    if path is None:
        return []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScratchGPTError(f"--api-key-file {path}: cannot read it ({exc})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    for number, key in enumerate(keys, 1):
        if not (key.isascii() and key.isprintable() and " " not in key):
            raise ScratchGPTError(f"--api-key-file {path}: key {number} must be printable ASCII without spaces")
    if not keys:
        raise ScratchGPTError(f"--api-key-file {path}: holds no key (one per line)")
    return keys


def _tls_files(certfile: str | None, keyfile: str | None) -> tuple[str, str] | None:
    """(certificate, key) for HTTPS, both existing, or None for plain HTTP."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        raise ScratchGPTError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    for flag, name in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not Path(name).is_file():
            raise ScratchGPTError(f"{flag} {name}: no such file")
    return certfile, keyfile


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run, plot_runs

    if args.labels and len(args.labels) != len(args.runs):
        raise ScratchGPTError(f"--labels needs one label per RUN: got {len(args.labels)} for {len(args.runs)} runs")
    if len(args.runs) == 1:
        path = plot_run(args.runs[0], args.out, args.x, title=args.labels[0] if args.labels else None)
    else:
        path = plot_runs(args.runs, args.out or "comparison.png", args.x, args.labels)
    print(f"wrote {path}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in preset_names():
        print(f"{name:18s} {load_preset(name).get('description', '')}")
    return 0


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if "RANK" in os.environ:  # a torchrun worker: see distributed.exit_if_joined
        from .distributed import exit_if_joined

        exit_if_joined(code)
    return code


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "bench":
        # Before the first tensor: glibc then reuses the memory each step frees (allocator.py).
        # Not for `bench`, whose two paths share one heap unlike any training run (BENCHMARKS.md).
        keep_freed_memory()
    handler = {"train": cmd_train, "sft": cmd_sft, "chat": cmd_chat, "sample": cmd_sample, "eval": cmd_eval, "bench": cmd_bench, "presets": cmd_presets,
               "serve": cmd_serve, "export": cmd_export, "import": cmd_import, "plot": cmd_plot}[args.command]
    try:
        if getattr(args, "threads", 0) < 0:
            raise ScratchGPTError(f"--threads must be >= 0 (0 follows the machine's load), got {args.threads}")
        # `train` and `bench` choose their threads from their config; the others here.
        import torch  # loaded already, by device.py

        # A server's event loop and request threads need a core of their own beside PyTorch's threads.
        most = max(1, torch.get_num_threads() - 1) if args.command == "serve" else None
        governor = governed(args.threads, say=_note, most=most) if args.command in ("sample", "chat", "eval", "serve") else nullcontext()
        with governor:
            return handler(args)
    except ScratchGPTError as exc:
        print(f"scratchgpt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"scratchgpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `scratchgpt sample | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"scratchgpt {args.command}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("SCRATCHGPT_DEBUG"):
            raise
        print(f"scratchgpt {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(set SCRATCHGPT_DEBUG=1 to see the traceback, and please report it)", file=sys.stderr)
        return 1
