"""Measure the local provider (Gemma 3 270M through llama.cpp) on this machine; prints Markdown.

    .venv/bin/python benchmarks/bench_local.py            # about a minute on 2 cores

What it measures, once per run: model load time, prompt and generation speed (tokens/s), resident memory,
few-shot answers on a labelled set, and how the executor's concurrency is best mapped onto the runtime
(throughput of each setting as a ratio to the default setting, measured in the same run).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nagents_frames import Provider, batch_complete
from nagents_frames.providers.local import resolve_model_path, unload_models

SENTIMENT_SHOTS = [
    ("Review: I love it, works perfectly.\nSentiment:", "positive"),
    ("Review: Broke on day one, waste of money.\nSentiment:", "negative"),
    ("Review: Great value, would buy again.\nSentiment:", "positive"),
    ("Review: Terrible quality, it fell apart.\nSentiment:", "negative"),
]
LABELLED = [
    ("Absolutely wonderful, I am very happy with it.", "positive"),
    ("Awful. It stopped working and support ignored me.", "negative"),
    ("The best purchase I made this year.", "positive"),
    ("Cheap plastic that cracked in a week, do not buy.", "negative"),
    ("The battery lasts two days and the screen is bright.", "positive"),
    ("Stopped working after a week; support never answered.", "negative"),
    ("Exactly as described, arrived early.", "positive"),
    ("The lid cracked the first time I dropped it.", "negative"),
    ("My kids love it and it survived the beach.", "positive"),
    ("Setup took five minutes; the app is clear.", "positive"),
    ("Returned it, the sound is tinny and harsh.", "negative"),
    ("Comfortable, light and well made.", "positive"),
]
OTHER_TASKS = [
    ("translation", "English: Good morning\nFrench: Bonjour\nEnglish: Thank you very much\nFrench: Merci beaucoup\n"
                    "English: Where is the station?\nFrench:"),
    ("extraction", "Text: Alice moved to Berlin in 2019.\nCity: Berlin\nText: Bob works in Tokyo for a bank.\nCity: Tokyo\n"
                   "Text: Last year Carol opened a cafe in Lisbon.\nCity:"),
    ("arithmetic", "2 + 2 = 4\n3 + 5 = 8\n7 + 6 ="),
    ("chat prompt (no template)", "Write a haiku about the sea."),
]


def rss_mb() -> float:
    """Current resident set size in MB (from /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    rows: list[str] = []
    base_rss = rss_mb()
    started = time.perf_counter()
    path = resolve_model_path("gemma-3-270m")
    resolve_s = time.perf_counter() - started
    size_mb = os.path.getsize(path) / 1e6

    from llama_cpp import Llama

    started = time.perf_counter()
    llama = Llama(model_path=path, n_ctx=2048, n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(),
                  verbose=False, seed=0)
    load_s = time.perf_counter() - started
    loaded_rss = rss_mb()
    has_template = any(k.startswith("tokenizer.chat_template") for k in llama.metadata)

    prompt = "The history of the city begins in the Roman era, when " * 8
    started = time.perf_counter()
    out: Any = llama.create_completion(prompt=prompt, max_tokens=1, temperature=0.0)
    prompt_s = time.perf_counter() - started
    prompt_tokens = out["usage"]["prompt_tokens"]
    llama.close()
    del llama

    # generation speed by thread count, interleaved so that the machine's other load hits both alike
    speeds: dict[int, list[float]] = {1: [], 2: []}
    for _round in range(2):
        for threads in speeds:
            llama = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
            started = time.perf_counter()
            out = llama.create_completion(prompt="Once upon a time", max_tokens=64, temperature=0.0, stop=[])
            speeds[threads].append(out["usage"]["completion_tokens"] / (time.perf_counter() - started))
            llama.close()
            del llama
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_avg = os.getloadavg()[0]

    rows.append("## Runtime: llama-cpp-python " + __import__("llama_cpp").__version__)
    rows.append("")
    rows.append("| measure | value |")
    rows.append("| --- | --- |")
    rows.append(f"| GGUF file | {Path(path).name}, {size_mb:.0f} MB (resolve/assemble: {resolve_s:.2f} s) |")
    rows.append(f"| chat template in GGUF | {'yes' if has_template else 'no'} |")
    rows.append(f"| load time | {load_s:.2f} s |")
    rows.append(f"| RSS before load / after load / peak | {base_rss:.0f} / {loaded_rss:.0f} / {peak_rss:.0f} MB |")
    rows.append(f"| prompt evaluation, {os.cpu_count()} threads | {prompt_tokens / prompt_s:.0f} tokens/s "
                f"({prompt_tokens} tokens) |")
    for threads, values in speeds.items():
        rows.append(f"| generation, {threads} thread(s) | {max(values):.1f} tokens/s best of {len(values)} "
                    f"({', '.join(f'{v:.1f}' for v in values)}) |")
    rows.append(f"| machine load average during the run | {load_avg:.1f} on {os.cpu_count()} cores |")
    rows.append("")

    # few-shot sentiment through batch_complete, as a user would run it
    table = pa.table({"review": [r for r, _ in LABELLED]})
    provider = Provider(provider_type="local", model="gemma-3-270m")
    started = time.perf_counter()
    result = batch_complete(table, provider=provider, prompt="Review: {review}\nSentiment:",
                            examples=SENTIMENT_SHOTS, max_tokens=3, usage=True, progress=False)
    elapsed = time.perf_counter() - started
    answers = result["response"].to_pylist()
    right = sum(a == want for a, (_, want) in zip(answers, LABELLED))
    rows.append(f"## Few-shot sentiment via batch_complete ({len(LABELLED)} rows, {elapsed:.1f} s, "
                f"{right}/{len(LABELLED)} right)")
    rows.append("")
    rows.append("| review | expected | answer |")
    rows.append("| --- | --- | --- |")
    for (review, want), got in zip(LABELLED, answers):
        rows.append(f"| {review} | {want} | {got} |")
    rows.append("")

    rows.append("## Other few-shot tasks (completion mode, stop at newline, max_tokens=16)")
    rows.append("")
    rows.append("| task | answer |")
    rows.append("| --- | --- |")
    other = batch_complete(pa.table({"prompt": [p for _, p in OTHER_TASKS]}), provider=provider, max_tokens=16,
                           progress=False)
    for (name, _), got, err in zip(OTHER_TASKS, other["response"].to_pylist(), other["error"].to_pylist()):
        rows.append(f"| {name} | {got!r} {err or ''} |")
    rows.append("")

    # concurrency mapping: instances x threads, throughput relative to the default (1 instance, all cores)
    n = 12
    work = pa.table({"review": [f"{r} (#{i})" for i, (r, _) in enumerate(LABELLED[:n])]})
    settings: list[tuple[str, dict[str, Any], int]] = [
        ("1 instance x 1 thread (default on 2 cores), concurrency=8", {"n_threads": 1}, 8),
        ("1 instance x 2 threads, concurrency=8", {"n_threads": 2}, 8),
        ("2 instances x 1 thread, concurrency=8", {"instances": 2, "n_threads": 1}, 8),
        ("1 instance x 1 thread, concurrency=1", {"n_threads": 1}, 1),
    ]
    rows.append(f"## Mapping the executor's concurrency ({n} distinct few-shot rows, max_tokens=3, best of 2 "
                "interleaved rounds)")
    rows.append("")
    rows.append("| setting | rows/s | ratio to default |")
    rows.append("| --- | --- | --- |")
    rates: dict[str, list[float]] = {label: [] for label, _, _ in settings}
    for _round in range(2):
        for label, options, concurrency in settings:
            unload_models()
            p = Provider(provider_type="local", model="gemma-3-270m", options=options)
            # warm-up (load) outside the timing
            batch_complete(pa.table({"prompt": ["a", "b"]}), provider=p, max_tokens=1, concurrency=2, progress=False)
            started = time.perf_counter()
            batch_complete(work, provider=p, prompt="Review: {review}\nSentiment:", examples=SENTIMENT_SHOTS,
                           max_tokens=3, concurrency=concurrency, progress=False)
            rates[label].append(n / (time.perf_counter() - started))
    baseline = max(rates[settings[0][0]])
    for label, values in rates.items():
        rows.append(f"| {label} | {max(values):.2f} | {max(values) / baseline:.2f} |")
    unload_models()
    rows.append("")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
