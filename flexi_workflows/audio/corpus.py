"""The built-in spoken corpus: short English sentences synthesized offline with eSpeak NG, written in the
LibriSpeech layout (16 kHz FLAC + `.trans.txt`), so a speech pipeline runs on a CPU with no download.

Text. A closed vocabulary of ~140 plain words (numbers written as words, no punctuation, no proper names)
in a few sentence patterns ("the small dog finds three red apples", "my old teacher sleeps near the
river") of 3–7 words. Transcripts are therefore unambiguous; at the slowest clean rate a 7-word sentence
lasts under 3 s, and any utterance over `MAX_SECONDS` (3.8 s, inside the tiny Whisper's 4 s window) is
replaced by a reserve sentence. No sentence text is shared between two splits: texts are drawn test
first, then dev, train and pretrain, each excluding all earlier ones.

Splits (LibriSpeech names). `pretrain-clean` pretrains the tiny Whisper; `train-*` fine-tune it;
`dev-*` and `test-*` evaluate. "clean" and "other" differ in conditions:

- clean: eight voices (`CLEAN_VOICES`: en, en-us, en+m3, en-us+m1, en+m2, en-us+m4, and the female en+f1
  and en-gb-x-rp+f3), normal rate (150–185 wpm), normal pitch (45–55), no noise (pauses are near-digital
  silence).
- other: five voices never heard in clean (`OTHER_VOICES`: the female en+f2 and en+f4, the Klatt-synthesizer
  en-us+klatt, the rough en+croak, a Scottish-accent en-gb-scotland+m5) — new formants, a different
  glottal source and different vowels; faster speech (200–260 wpm: shorter, coarticulated segments);
  shifted pitch (20–80) and pitch range; and additive noise at 8–20 dB SNR (seeded white Gaussian noise,
  brown rumble and a 50/60 Hz hum with harmonics, mixed in random proportions) with a short noisy lead-in.
  The words, the sentence patterns and the speech stay intelligible, so train-other can teach them.

How hard "other" is (measured with the tiny Whisper pretrained on pretrain-clean, models/pretrain_speech.py):
WER 10 % on test-clean and 97 % on test-other. New voices alone already cost most of it: with four clean
voices and other speech at the clean rate and 40–50 dB SNR the same kind of model read 64 % of other's
words wrong (voices), and 88 % at 185–230 wpm and 15–25 dB (voices, rate and noise together). Eight
clean voices (version 2; version 1 had four, and other at 230–300 wpm and 5–15 dB) keep the base
competent on clean while LoRA fine-tuning on train-clean + train-other can bring other down
(LoRA-8 on every linear layer, 8 epochs: 97 % → 57 %).

Determinism. Every random choice comes from `numpy` generators seeded by (spec seed, split, utterance),
and eSpeak's own generators are reseeded per utterance. eSpeak's wave generator also carries internal state
from one utterance to the next, which neither reseeding nor `espeak_Terminate` + `espeak_Initialize`
resets (measured): the same call can differ by a few samples depending on what was spoken before it
in the process.
So each split is synthesized in a fresh worker process, in a fixed order: the same spec gives
byte-identical FLAC files whatever the number of workers (tests/audio checks it).

Cost (measured): the default `spoken-tiny` corpus — 4,300 utterances, 7,560 s (2.1 h) of audio, of which
5,430 s pretrain-clean, 164 MB of FLAC — builds in about 20 s on a shared 2-core machine (≈ 5 ms per
utterance: 2 ms eSpeak, the rest resampling, noise and FLAC). Mean durations: 1.8 s clean, 1.4 s other;
the longest utterance is 3.1 s, so the 3.8 s limit never triggered with these settings. `corpus.json`
records the seconds of every split.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flexi_workflows.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CORPUS_VERSION = 2
BUILTIN_PREFIX = "builtin:"
SAMPLE_RATE = 16000
MAX_SECONDS = 3.8
MIN_WORDS, MAX_WORDS = 3, 7

# ---------------------------------------------------------------------------------------------- text

NOUNS = [  # (singular, plural)
    ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("horse", "horses"), ("boy", "boys"),
    ("girl", "girls"), ("man", "men"), ("woman", "women"), ("child", "children"), ("teacher", "teachers"),
    ("farmer", "farmers"), ("king", "kings"), ("apple", "apples"), ("box", "boxes"), ("book", "books"),
    ("cup", "cups"), ("ball", "balls"), ("hat", "hats"), ("car", "cars"), ("boat", "boats"),
    ("tree", "trees"), ("house", "houses"), ("river", "rivers"), ("window", "windows"), ("door", "doors"),
    ("stone", "stones"), ("flower", "flowers"), ("letter", "letters"), ("chair", "chairs"),
    ("table", "tables"), ("egg", "eggs"), ("key", "keys"), ("shoe", "shoes"), ("lamp", "lamps"),
    ("coat", "coats"), ("train", "trains"),
]
ADJECTIVES = ["small", "big", "red", "green", "blue", "old", "young", "happy", "quiet", "bright", "dark",
              "warm", "cold", "heavy", "little", "yellow", "brown", "white", "black", "tall"]
TRANSITIVE = ["finds", "sees", "takes", "carries", "wants", "likes", "buys", "paints", "moves", "opens",
              "holds", "counts", "brings", "needs", "keeps"]
INTRANSITIVE = ["sleeps", "runs", "waits", "sits", "walks", "sings", "jumps"]
PREPOSITIONS = ["near", "under", "behind", "beside", "over", "into", "in", "on"]
DETERMINERS = ["the", "my", "our", "this", "that", "his", "her"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]
VOCABULARY = sorted({w for pair in NOUNS for w in pair} | set(ADJECTIVES) | set(TRANSITIVE)
                    | set(INTRANSITIVE) | set(PREPOSITIONS) | set(DETERMINERS) | set(NUMBERS))


def _noun_phrase(rng: np.random.Generator, *, plural_ok: bool) -> list[str]:
    adjective = [str(rng.choice(ADJECTIVES))] if rng.random() < 0.5 else []
    singular, plural = NOUNS[rng.integers(len(NOUNS))]
    if plural_ok and rng.random() < 0.4:
        return [str(rng.choice(NUMBERS)), *adjective, plural]
    return [str(rng.choice(DETERMINERS)), *adjective, singular]


def random_sentence(rng: np.random.Generator) -> str:
    """One sentence of MIN_WORDS–MAX_WORDS words over VOCABULARY (lower case, no punctuation)."""
    while True:
        words = _noun_phrase(rng, plural_ok=False)
        if rng.random() < 0.6:
            words += [str(rng.choice(TRANSITIVE)), *_noun_phrase(rng, plural_ok=True)]
        else:
            words.append(str(rng.choice(INTRANSITIVE)))
            if rng.random() < 0.7:
                words += [str(rng.choice(PREPOSITIONS)), *_noun_phrase(rng, plural_ok=False)]
        if MIN_WORDS <= len(words) <= MAX_WORDS:
            return " ".join(words)


# --------------------------------------------------------------------------------------- conditions

CLEAN_VOICES = ["en", "en-us", "en+m3", "en-us+m1", "en+m2", "en-us+m4", "en+f1", "en-gb-x-rp+f3"]
OTHER_VOICES = ["en+f2", "en+f4", "en-us+klatt", "en+croak", "en-gb-scotland+m5"]
# LibriSpeech-style integer speaker ids, one per voice; clean and other never share one.
SPEAKERS = {v: 100 + i for i, v in enumerate(CLEAN_VOICES)} | {v: 200 + i for i, v in enumerate(OTHER_VOICES)}
# Test first, then dev, train, pretrain: the order in which texts are drawn (each excludes earlier ones).
SPLITS = ["test-clean", "test-other", "dev-clean", "dev-other", "train-clean", "train-other",
          "pretrain-clean"]


def _condition(split: str) -> str:
    return split.rsplit("-", 1)[1]


def _chapter(speaker: int, split: str) -> int:
    """One chapter per (speaker, split), so no two splits share a folder."""
    return speaker * 10 + SPLITS.index(split)


@dataclass
class CorpusSpec:
    """Sizes (utterances per split) and the seed of a generated corpus."""

    pretrain_clean: int = 3000
    train_clean: int = 400
    train_other: int = 400
    dev_clean: int = 100
    dev_other: int = 100
    test_clean: int = 150
    test_other: int = 150
    seed: int = 0
    clean_rate: tuple[int, int] = (150, 185)
    other_rate: tuple[int, int] = (200, 260)
    other_snr_db: tuple[float, float] = (8.0, 20.0)
    workers: int = 0  # parallel worker processes (0: min(2, cpu count)); the output does not depend on it

    def size(self, split: str) -> int:
        return int(getattr(self, split.replace("-", "_")))

    def fingerprint_data(self) -> dict:
        data = asdict(self)
        data.pop("workers")
        return {"spec": data, "version": CORPUS_VERSION}


def _reserve(n: int) -> int:
    """Spare sentences per split, used in order when an utterance runs over MAX_SECONDS."""
    return 4 + n // 20


def plan_texts(spec: CorpusSpec) -> dict[str, dict[str, list[str]]]:
    """split → {"texts": [...], "reserve": [...]}; all texts distinct across the corpus."""
    used: set[str] = set()
    plan = {}
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([spec.seed, 1, split_index])
        texts: list[str] = []
        wanted = spec.size(split) + _reserve(spec.size(split))
        for _ in range(1000 * wanted + 1000):
            if len(texts) == wanted:
                break
            text = random_sentence(rng)
            if text not in used:
                used.add(text)
                texts.append(text)
        else:
            raise ConfigError(f"corpus split {split}: cannot draw {wanted} distinct sentences")
        plan[split] = {"texts": texts[:spec.size(split)], "reserve": texts[spec.size(split):]}
    return plan


def plan_split(spec: CorpusSpec, split: str, texts: list[str], reserve: list[str]) -> dict:
    """The conditions of every utterance of `split`: voice, rate, pitch, noise (all seeded)."""
    split_index = SPLITS.index(split)
    other = _condition(split) == "other"
    voices = OTHER_VOICES if other else CLEAN_VOICES
    rng = np.random.default_rng([spec.seed, 2, split_index])
    utterances = []
    for i in range(len(texts)):
        voice = voices[int(rng.integers(len(voices)))]
        if other:
            cond = {"rate": int(rng.integers(spec.other_rate[0], spec.other_rate[1] + 1)),
                    "pitch": int(rng.integers(20, 81)), "pitch_range": int(rng.integers(20, 91)),
                    "snr_db": float(rng.uniform(*spec.other_snr_db)),
                    "noise_mix": [float(x) for x in rng.dirichlet([1.0, 1.0, 1.0])],
                    "hum_hz": float(rng.choice([50.0, 60.0])), "lead_s": float(rng.uniform(0.0, 0.25))}
        else:
            cond = {"rate": int(rng.integers(spec.clean_rate[0], spec.clean_rate[1] + 1)),
                    "pitch": int(rng.integers(45, 56)), "pitch_range": 50, "snr_db": None}
        utterances.append(dict(index=i, voice=voice, seed=int(rng.integers(1, 2**31 - 1)), **cond))
    # LibriSpeech ids: speaker-chapter-utt, utt numbered per chapter in utterance order.
    counters: dict[int, int] = {}
    for u in utterances:
        speaker = SPEAKERS[u["voice"]]
        chapter = _chapter(speaker, split)
        u["utt_id"] = f"{speaker}-{chapter}-{counters.get(chapter, 0):04d}"
        u["path"] = f"{split}/{speaker}/{chapter}/{u['utt_id']}.flac"
        counters[chapter] = counters.get(chapter, 0) + 1
    return {"split": split, "seed": spec.seed, "texts": texts, "reserve": reserve, "utterances": utterances}


# ------------------------------------------------------------------------------------ audio (worker)

def _noise(n: int, u: dict, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise: white Gaussian, brown rumble and mains hum mixed by u["noise_mix"]."""
    white = rng.standard_normal(n)
    brown = np.cumsum(rng.standard_normal(n))
    brown -= np.convolve(brown, np.ones(801) / 801, mode="same")  # drop the drift, keep the rumble
    t = np.arange(n) / SAMPLE_RATE
    phase = rng.uniform(0, 2 * np.pi, 3)
    hum = sum(np.sin(2 * np.pi * u["hum_hz"] * k * t + phase[k - 1]) / k for k in (1, 2, 3))
    parts = [p / np.sqrt(np.mean(p**2) + 1e-12) for p in (white, brown, hum)]
    mix = sum(np.sqrt(w) * p for w, p in zip(u["noise_mix"], parts))
    return mix / np.sqrt(np.mean(mix**2) + 1e-12)


def render(engine, text: str, u: dict) -> np.ndarray:
    """Synthesize `text` under the conditions `u`: int16 at SAMPLE_RATE."""
    import soxr

    pcm, rate = engine.synthesize(text, voice=u["voice"], rate=u["rate"], pitch=u["pitch"],
                                  pitch_range=u["pitch_range"], seed=u["seed"])
    if pcm.size == 0 or not np.any(pcm):
        raise DataError(f"eSpeak produced silence for {text!r} with voice {u['voice']}")
    x = soxr.resample(pcm.astype(np.float64) / 32768.0, rate, SAMPLE_RATE)
    if u["snr_db"] is not None:
        rng = np.random.default_rng(u["seed"])
        x = np.concatenate([np.zeros(int(u["lead_s"] * SAMPLE_RATE)), x])
        active = np.abs(x) > 0.02 * np.abs(x).max()
        speech_power = np.mean(x[active] ** 2)
        x = x + _noise(x.size, u, rng) * np.sqrt(speech_power / 10 ** (u["snr_db"] / 10))
    peak = np.abs(x).max()
    if peak > 0.95:
        x *= 0.95 / peak
    return np.round(x * 32767).astype(np.int16)


def _worker(plan_path: str, out_root: str) -> None:
    """Synthesize one split's plan into out_root, in order; print one line per utterance."""
    import soundfile as sf

    from flexi_workflows.audio.espeak import Espeak

    plan = json.loads(Path(plan_path).read_text())
    engine = Espeak()
    reserve = list(plan["reserve"])
    results = []
    for u in plan["utterances"]:
        text = plan["texts"][u["index"]]
        audio = render(engine, text, u)
        while audio.size > MAX_SECONDS * SAMPLE_RATE:
            if not reserve:
                raise DataError(f"{plan['split']}: utterances over {MAX_SECONDS} s "
                                "and no reserve sentence left")
            text = reserve.pop(0)
            audio = render(engine, text, u)
        path = Path(out_root) / u["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        results.append({"utt_id": u["utt_id"], "path": u["path"], "text": text,
                        "seconds": audio.size / SAMPLE_RATE})
        print(u["utt_id"], flush=True)
    Path(plan_path).with_suffix(".done.json").write_text(json.dumps(results))


# -------------------------------------------------------------------------------------------- build

def _run_worker(plan: dict, tmp: Path, on_utterance) -> list[dict]:
    plan_path = tmp / f".plan-{plan['split']}.json"
    plan_path.write_text(json.dumps(plan))
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    code = "import sys; from flexi_workflows.audio.corpus import _worker; _worker(*sys.argv[1:])"
    cmd = [sys.executable, "-c", code, str(plan_path), str(tmp)]
    err_path = plan_path.with_suffix(".err")
    with err_path.open("w+") as err_file, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env) as proc:
        for _line in proc.stdout:  # one line per finished utterance
            on_utterance()
        proc.wait()
        err_file.seek(0)
        err = err_file.read()
    err_path.unlink()
    if proc.returncode != 0:
        raise DataError(f"building corpus split {plan['split']} failed:\n{err.strip()[-2000:]}")
    done = plan_path.with_suffix(".done.json")
    results = json.loads(done.read_text())
    plan_path.unlink()
    done.unlink()
    return results


def build_corpus(root: str | Path, spec: CorpusSpec) -> Path:
    """Write the corpus of `spec` at `root` (replaced atomically: a crash leaves nothing half-written)."""
    from tqdm import tqdm

    from flexi_workflows.audio.espeak import Espeak
    from flexi_workflows.fsutil import atomic_dir

    Espeak()  # fail here, with a clear message, if eSpeak cannot load
    root = Path(root)
    texts = plan_texts(spec)
    plans = [plan_split(spec, s, texts[s]["texts"], texts[s]["reserve"]) for s in SPLITS if spec.size(s) > 0]
    total = sum(len(p["utterances"]) for p in plans)
    workers = spec.workers or min(2, os.cpu_count() or 1)
    lock = threading.Lock()
    with atomic_dir(root) as tmp, tqdm(total=total, desc="synthesizing the spoken corpus", unit="utt") as bar:
        def tick():
            with lock:
                bar.update(1)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = dict(zip([p["split"] for p in plans],
                               pool.map(lambda p: _run_worker(p, tmp, tick), plans)))
        summary = {}
        for split, rows in results.items():
            chapters: dict[Path, list[str]] = {}
            for r in rows:
                chapters.setdefault((tmp / r["path"]).parent, []).append(f"{r['utt_id']} {r['text'].upper()}")
            for folder, lines in chapters.items():
                speaker, chapter = folder.parent.name, folder.name
                (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(sorted(lines)) + "\n")
            summary[split] = {"utterances": len(rows), "seconds": round(sum(r["seconds"] for r in rows), 3),
                              "speakers": sorted({int(r["utt_id"].split("-")[0]) for r in rows}),
                              "max_seconds": round(max((r["seconds"] for r in rows), default=0.0), 4)}
        meta = {"format_version": CORPUS_VERSION, "layout": "librispeech", "sample_rate": SAMPLE_RATE,
                "spec": spec.fingerprint_data()["spec"], "splits": summary,
                "voices": {"clean": CLEAN_VOICES, "other": OTHER_VOICES},
                "speakers": {str(v): k for k, v in SPEAKERS.items()}, "vocabulary_size": len(VOCABULARY),
                "max_seconds": MAX_SECONDS}
        (tmp / "corpus.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return root


# ----------------------------------------------------------------------------------------- built-ins

BUILTIN_CORPORA = {"spoken-tiny": CorpusSpec()}


def builtin_corpus_spec(ref: str) -> CorpusSpec | None:
    """`builtin:<name>` → its spec; None for any other reference; ConfigError for an unknown name."""
    if not ref.startswith(BUILTIN_PREFIX):
        return None
    name = ref[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_CORPORA:
        raise ConfigError(f"corpus {ref!r}: unknown built-in corpus; known: "
                          + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_CORPORA))
    return BUILTIN_CORPORA[name]


def corpus_folder_name(name: str) -> str:
    """The cache folder name of a built-in corpus: its name and a fingerprint of its spec and version."""
    from flexi_workflows.fsutil import fingerprint

    ref = name if name.startswith(BUILTIN_PREFIX) else BUILTIN_PREFIX + name
    spec = builtin_corpus_spec(ref)
    return f"{ref[len(BUILTIN_PREFIX):]}-{fingerprint(spec.fingerprint_data())}"


def resolve_builtin_corpus(name: str, cache_dir: str | Path) -> Path:
    """`builtin:spoken-tiny` (or `spoken-tiny`) → its cached corpus folder, built on first use."""
    ref = name if name.startswith(BUILTIN_PREFIX) else BUILTIN_PREFIX + name
    spec = builtin_corpus_spec(ref)
    from flexi_workflows.storage import file_lock

    folder = Path(cache_dir).expanduser() / corpus_folder_name(ref)
    if (folder / "corpus.json").is_file():
        return folder
    with file_lock(folder.parent / f".{folder.name}.lock"):  # two first runs at once: one builds, the other waits
        if not (folder / "corpus.json").is_file():
            log.info("building %s (first run only) into %s", ref, folder)
            build_corpus(folder, spec)
    return folder
