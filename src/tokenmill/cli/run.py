"""`tokenmill run TASK INPUT...`: run a pipeline on inputs from the arguments or standard input.

Inputs come from the arguments, or one per line from standard input when there are
none or one of them is "-". Tasks whose inputs are not plain texts take the rest from
flags: question-answering ``--question`` (each input is a context), zero-shot
classification ``--candidate-labels``, sentence-similarity ``--source`` (each input is
a sentence compared to it); ``--json-input`` reads each input as JSON instead (a text
pair ``{"text": ..., "text_pair": ...}``, a ``{"question", "context"}`` dict, ...).
Results print as a table, or as the pipeline's JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

#: flags that only some tasks take: flag -> (argparse dest, task)
_TASK_FLAGS = {
    "--question": ("question", "question-answering"),
    "--candidate-labels": ("candidate_labels", "zero-shot-classification"),
    "--source": ("source", "sentence-similarity"),
    "--return-timestamps": ("return_timestamps", "automatic-speech-recognition"),
    "--language": ("language", "automatic-speech-recognition"),
    "--task": ("speech_task", "automatic-speech-recognition"),
}
_CLIP = 60


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``name=value`` pairs; a value is JSON when it parses as JSON, else a string."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--option takes name=value (e.g. --option top_k=3), got {pair!r}")
        try:
            options[name] = json.loads(raw)
        except ValueError:
            options[name] = raw
    return options


def read_inputs(args: argparse.Namespace) -> list[str]:
    """The raw inputs: the arguments, with "-" (or no argument at all) read from standard input."""
    given = list(args.inputs)
    if not given:
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("give the inputs as arguments, or one per line on standard input")
        given = ["-"]
    out: list[str] = []
    stdin_read = False
    for item in given:
        if item != "-":
            out.append(item)
            continue
        if stdin_read:
            raise ValueError("'-' (standard input) may be given only once")
        stdin_read = True
        out.extend(line.rstrip("\r\n") for line in sys.stdin if line.strip())
    if not out:
        raise ValueError("no inputs: standard input held no non-empty line")
    return out


def _check_task_flags(args: argparse.Namespace, task: str) -> None:
    for flag, (dest, owner) in _TASK_FLAGS.items():
        if getattr(args, dest) is not None and task != owner:
            raise ValueError(f"{flag} is for {owner}; {task} does not take it")


def build_call(args: argparse.Namespace, task: str, raw: list[str]) -> tuple[Any, dict[str, Any]]:
    """The pipeline's inputs and call options from the command line."""
    options = parse_options(args.option)
    if args.truncation:
        options["truncation"] = True
    if args.json_input:
        for flag, dest in (("--question", "question"), ("--source", "source")):
            if getattr(args, dest) is not None:
                raise ValueError(f"{flag} and --json-input both give the inputs; use one of them")
        items: list[Any] = []
        for i, line in enumerate(raw):
            try:
                items.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"input {i} is not valid JSON ({e}): {_clip(line)}") from None
    else:
        items = list(raw)
    if task == "question-answering" and not args.json_input:
        if args.question is None:
            raise ValueError(
                "question-answering needs --question Q (each input is a context to search), "
                'or --json-input lines {"question": ..., "context": ...}'
            )
        items = [{"question": args.question, "context": c} for c in items]
    if task == "sentence-similarity" and not args.json_input:
        if args.source is None:
            raise ValueError(
                "sentence-similarity needs --source S (each input is a sentence compared to it), "
                'or --json-input lines {"source_sentence": ..., "sentences": [...]}'
            )
        return {"source_sentence": args.source, "sentences": items}, options
    if task == "automatic-speech-recognition":
        # inputs are audio files; the flags are the pipeline's options
        for dest, option in (
            ("return_timestamps", "return_timestamps"),
            ("language", "language"),
            ("speech_task", "task"),
        ):
            if getattr(args, dest) is not None:
                options[option] = getattr(args, dest)
    if task == "zero-shot-classification":
        if args.candidate_labels is not None:
            labels = [s.strip() for s in args.candidate_labels.split(",") if s.strip()]
            if not labels:
                raise ValueError("--candidate-labels takes comma-separated labels, e.g. sports,politics")
            options["candidate_labels"] = labels
        elif "candidate_labels" not in options:
            raise ValueError("zero-shot-classification needs --candidate-labels a,b,c")
    return items, options


def run(args: argparse.Namespace) -> int:
    from tokenmill.pipelines.registry import resolve_task

    spec, _implied = resolve_task(args.task)
    _check_task_flags(args, spec.name)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.model is None and spec.default_model is None:
        raise ValueError(
            f"task {spec.name!r} has no default model in tokenmill; pass --model with a checkpoint "
            "fine-tuned for it (a directory or a Hub repo id)"
        )
    raw = read_inputs(args)
    inputs, options = build_call(args, spec.name, raw)

    from tokenmill.pipelines import pipeline
    from tokenmill.pipelines.base import PipelineInputError

    pipe = pipeline(
        args.task,
        model=args.model,
        device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype,
        revision=args.revision,
        batch_size=args.batch_size,
    )
    try:
        result, per_input = call_pipeline(pipe, inputs, options)
    except PipelineInputError as e:
        # the pipelines speak Python; here the option is a flag
        raise PipelineInputError(str(e).replace("pass truncation=True", "pass --truncation")) from None
    if args.json:
        compact = spec.name == "feature-extraction"  # vectors: one line, not one number per line
        from tokenmill.pipelines.hf_backend import to_json

        print(json.dumps(to_json(result), ensure_ascii=False, indent=None if compact else 2))
        return 0
    print(format_results(spec.name, inputs, per_input))
    return 0


def call_pipeline(pipe: Any, inputs: Any, options: dict[str, Any]) -> tuple[Any, list[Any]]:
    """What ``pipe(inputs, **options)`` returns, and the results one per input.

    The two differ where transformers' shapes do (a one-input list's result unwrapped, a
    lone string's label wrapped in a list); the per-input results are what the
    pipeline's ``run`` step gave, before ``__call__`` reshaped them.
    """
    from tokenmill.pipelines.base import Pipeline

    if not isinstance(pipe, Pipeline):  # text-generation: a list in, one result per input out
        result = pipe(inputs, **options)
        return result, result if isinstance(inputs, list) else [result]
    run = pipe.run
    seen: list[list[Any]] = []

    def record(items: list[Any], opts: dict[str, Any]) -> list[Any]:
        out = run(items, opts)
        seen.append(out)
        return out

    view = copy.copy(pipe)  # the pipeline itself stays as it was
    view.run = record
    result = view(inputs, **options)
    if len(seen) == 1:
        return result, seen[0]
    return result, result if isinstance(inputs, list) else [result]


# -- tables ------------------------------------------------------------------------


def _clip(value: Any, limit: int = _CLIP) -> str:
    s = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    s = s.replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _cell(value: Any, clip: bool) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, str):
        return _clip(value) if clip else value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return _vector(value)
    return _clip(value) if clip else json.dumps(value, ensure_ascii=False)


def _vector(values: list[Any]) -> str:
    head = " ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values[:4])
    return f"[{len(values)} values] {head}{' ...' if len(values) > 4 else ''}"


def _table(rows: list[dict[str, Any]], indent: str = "    ") -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    clip = len(columns) > 1  # one column of generated text prints whole
    cells = [[_cell(row.get(c, ""), clip) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for r in cells:
        lines.append(indent + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return lines


def _depth(value: Any) -> int:
    d = 0
    while isinstance(value, list) and value:
        d, value = d + 1, value[0]
    return d


def _result_lines(result: Any, indent: str = "    ") -> list[str]:
    if isinstance(result, dict) and isinstance(result.get("labels"), list) and "scores" in result:
        rows = [{"label": label, "score": s} for label, s in zip(result["labels"], result["scores"])]
        return _table(rows, indent)  # zero-shot: one row per candidate label
    if isinstance(result, dict):
        return _table([result], indent)
    if isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        return _table(result, indent)
    if isinstance(result, list) and result and all(isinstance(r, (int, float)) for r in result):
        return [indent + _vector(result)]
    if isinstance(result, list) and _depth(result) == 3 and len(result) == 1:
        tokens = result[0]  # feature-extraction without pooling: [1, tokens, hidden]
        return [indent + f"{len(tokens)} tokens x {len(tokens[0])} values"]
    if isinstance(result, list) and result and all(isinstance(r, list) for r in result):
        lines = []
        for k, part in enumerate(result):  # e.g. fill-mask with several masks: one table per mask
            lines.append(f"{indent}({k + 1})")
            lines += _result_lines(part, indent + "  ")
        return lines
    if isinstance(result, list) and not result:
        return [indent + "(nothing)"]
    return [indent + _cell(result, clip=False)]


def format_results(task: str, inputs: Any, results: list[Any]) -> str:
    """A readable table per input, from the results one per input."""
    if task == "sentence-similarity" and isinstance(inputs, dict):
        rows = [{"sentence": s, "score": v} for s, v in zip(inputs["sentences"], results[0])]
        return "\n".join([f"source: {inputs['source_sentence']}", *_table(rows, "")])
    items = inputs if isinstance(inputs, list) else [inputs]
    lines: list[str] = []
    if task == "automatic-speech-recognition":
        for k, (item, res) in enumerate(zip(items, results)):
            lines += [f"[{k + 1}] {_clip(item)}", *_speech_lines(res)]
        return "\n".join(lines)
    for k, (item, res) in enumerate(zip(items, results)):
        if isinstance(item, dict) and set(item) == {"question", "context"}:
            shown = f"{_clip(item['question'], 40)} | {_clip(item['context'])}"
        else:
            shown = _clip(item)
        lines.append(f"[{k + 1}] {shown}")
        lines += _result_lines(res)
    return "\n".join(lines)


def _speech_lines(result: dict[str, Any], indent: str = "    ") -> list[str]:
    """A transcript whole, then its segments one per line with their times."""
    lines = [indent + result["text"].strip()]
    chunks = result.get("chunks")
    if chunks and "timestamp" in chunks[0]:
        lines.append("")
        for c in chunks:
            start, end = c["timestamp"]
            stop = "?" if end is None else f"{end:7.2f}"
            lines.append(f"{indent}{start:7.2f} -> {stop}  {c['text'].strip()}")
    return lines
