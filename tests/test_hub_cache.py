"""`--ckpt org/name`: a checkpoint already in the Hugging Face hub cache is found offline, and a checkpoint that
is not there (or a folder that does not exist) is a clear error.

The fixture writes a cache the way huggingface_hub lays it out (models--org--name/refs/<branch> holding a commit
hash, snapshots/<hash>/<file> symlinks into blobs/<sha256>), and huggingface_hub's own
`try_to_load_from_cache` is the reference for which file a repo id and revision mean.
"""
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import try_to_load_from_cache

import train
from llama import ModelArgs, Tokenizer, Transformer, load_model, save_model
from llama import generate as generate_cli
from llama.checkpoint import CheckpointError, find_tokenizer, hub_cache_dirs, resolve_checkpoint

DEMO_TOK = train.DEMO / "tiny-llama" / "tokenizer.model"
REPO = "test-org/Tiny-Llama-2-hf"
COMMITS = {"main": "a" * 40, "v2": "b" * 40}  # branch/tag -> commit


def tiny_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=Tokenizer(str(DEMO_TOK)).n_words,
                     multiple_of=16, max_seq_len=128)
    return Transformer(args)


def write_snapshot(cache: Path, repo_id: str, commit: str, src: Path, ref: str | None) -> Path:
    """Copy the files of `src` into the cache as huggingface_hub stores a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / sha).write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes the hash without a newline
    return snap


@pytest.fixture(scope="module")
def models():
    return {ref: tiny_model(seed) for seed, ref in enumerate(COMMITS)}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, models):
    """Each revision's model saved in HF layout with the tokenizer, as a plain folder."""
    root = tmp_path_factory.mktemp("hf_src")
    return {ref: save_model(m, root / ref, layout="hf", tokenizer=DEMO_TOK) for ref, m in models.items()}


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No hub-cache setting of this machine leaks in; the home folder is empty."""
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def cache(clean_env, hf_folders, monkeypatch):
    """A hub cache in $HF_HUB_CACHE with main and tag v2."""
    cache = clean_env / "hub-cache"
    for ref, commit in COMMITS.items():
        write_snapshot(cache, REPO, commit, hf_folders[ref], ref)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def same_weights(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_repo_id_resolves_to_the_snapshot_huggingface_hub_would_use(cache):
    for rev, spec in [("main", REPO), ("v2", f"{REPO}@v2"), (COMMITS["main"], f"{REPO}@{COMMITS['main']}")]:
        ref = try_to_load_from_cache(REPO, "config.json", cache_dir=cache, revision=rev)
        assert isinstance(ref, str), rev
        assert resolve_checkpoint(spec) / "config.json" == Path(ref)


def test_load_model_and_tokenizer_from_the_hub_cache(cache, models):
    m = load_model(REPO, dtype=torch.float32)
    assert same_weights(m, models["main"])
    assert same_weights(load_model(f"{REPO}@v2", dtype=torch.float32), models["v2"])
    tok = find_tokenizer(REPO)
    assert tok == cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMITS["main"] / "tokenizer.model"
    assert tok.read_bytes() == DEMO_TOK.read_bytes()  # through the symlink into blobs/


def test_hf_home_and_default_cache_folders(clean_env, hf_folders, monkeypatch):
    home_cache = clean_env / "hf-home" / "hub"
    write_snapshot(home_cache, REPO, COMMITS["main"], hf_folders["main"], "main")
    monkeypatch.setenv("HF_HOME", str(clean_env / "hf-home"))
    assert resolve_checkpoint(REPO) == home_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMITS["main"]
    monkeypatch.delenv("HF_HOME")
    default = clean_env / "home" / ".cache" / "huggingface" / "hub"
    assert hub_cache_dirs() == [default]
    snap = write_snapshot(default, "other-org/m", COMMITS["v2"], hf_folders["v2"], None)  # by commit, no refs/
    assert resolve_checkpoint("other-org/m") == snap


def test_existing_path_wins_over_the_cache(cache, hf_folders, monkeypatch):
    """A relative folder spelled like a repo id is that folder, even when the repo is in the cache."""
    monkeypatch.chdir(cache.parent)
    Path("test-org").mkdir()
    Path("test-org", "Tiny-Llama-2-hf").symlink_to(hf_folders["v2"])
    assert resolve_checkpoint(REPO) == Path(REPO)


def test_missing_repo_says_folder_missing_then_lists_cache_folders(clean_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(clean_env / "a"))
    monkeypatch.setenv("HF_HOME", str(clean_env / "b"))
    with pytest.raises(CheckpointError) as e:
        load_model("meta-llama/Llama-2-7b-hf")
    msg = str(e.value)
    assert msg.startswith("checkpoint folder meta-llama/Llama-2-7b-hf does not exist")
    for folder in (clean_env / "a", clean_env / "b" / "hub", clean_env / "home" / ".cache" / "huggingface" / "hub"):
        assert str(folder / "models--meta-llama--Llama-2-7b-hf") in msg
    assert "huggingface-cli download meta-llama/Llama-2-7b-hf" in msg


def test_missing_revision_names_what_the_cache_has(cache):
    with pytest.raises(CheckpointError, match=r"no snapshot for revision 'v3'.*refs: \['main', 'v2'\]"):
        resolve_checkpoint(f"{REPO}@v3")


def test_nonexistent_folder_is_said_first(clean_env, tiny_train_ckpt, capsys):
    missing = clean_env / "nonexistent"
    with pytest.raises(CheckpointError, match=rf"^checkpoint folder {re.escape(str(missing))} does not exist$"):
        load_model(missing)
    rc = train.main(["--ckpt", str(missing), "--data", str(tiny_train_ckpt / "data.jsonl"),
                     "--out", str(clean_env / "o"), "--max-steps", "1"])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""  # nothing else is said before the error
    assert cap.err == f"error: checkpoint folder {missing} does not exist\n"
    assert generate_cli.main(["--ckpt", str(missing), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"error: checkpoint folder {missing} does not exist\n"


def test_a_mistyped_local_folder_is_named_not_looked_up_in_the_cache(cache, tiny_train_ckpt, monkeypatch, capsys):
    """A path whose parent folder exists is a local folder, whatever it looks like: the error names the closest
    folder beside it, not a hub download. An org/name whose org is no local folder is still looked up."""
    monkeypatch.chdir(cache.parent)
    for d in ("demo/tiny-llama", "demo/data", "llama-2-7b"):
        Path(d).mkdir(parents=True)
    for typo, near in [("demo/tiny_llama", "demo/tiny-llama"), ("./demo/tinyllama", "demo/tiny-llama"),
                       ("llama-2-7", "llama-2-7b"), (f"{cache.parent}/llama_2_7b", f"{cache.parent}/llama-2-7b")]:
        with pytest.raises(CheckpointError) as e:
            resolve_checkpoint(typo)
        assert str(e.value) == f"checkpoint folder {typo} does not exist; did you mean {near}?"
    with pytest.raises(CheckpointError, match=r"^checkpoint folder demo/zzz does not exist$"):  # nothing close
        resolve_checkpoint("demo/zzz")
    with pytest.raises(CheckpointError, match="huggingface-cli download test-org/Tiny-Llama-3-hf"):
        resolve_checkpoint("test-org/Tiny-Llama-3-hf")
    assert train.main(["--ckpt", "demo/tiny_llama", "--data", str(tiny_train_ckpt / "data.jsonl")]) == 2
    assert generate_cli.main(["--ckpt", "demo/tiny_llama"]) == 2
    want = "error: checkpoint folder demo/tiny_llama does not exist; did you mean demo/tiny-llama?\n"
    assert capsys.readouterr().err == want * 2


def test_train_and_generate_take_a_repo_id(cache, tiny_train_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    rc = train.main(["--ckpt", REPO, "--data", str(tiny_train_ckpt / "data.jsonl"), "--out", str(out),
                     "--max-steps", "1", "--seq-len", "64", "--batch-size", "2", "--quant", "none"])
    assert rc == 0
    snap = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMITS["main"]
    assert json.loads((out / "run_config.json").read_text())["ckpt"] == str(snap)  # the exact revision trained on
    assert (out / "adapter" / "tokenizer.model").read_bytes() == DEMO_TOK.read_bytes()
    capsys.readouterr()
    assert generate_cli.main(["--ckpt", f"{REPO}@v2", "--prompt", "hi", "--max-new-tokens", "2",
                              "--temperature", "0"]) == 0


def test_an_incomplete_cache_entry_does_not_hide_a_complete_one(clean_env, hf_folders, monkeypatch):
    """A repo folder without the snapshot in $HF_HUB_CACHE (an interrupted download), the whole snapshot in
    $HF_HOME/hub: the snapshot is found."""
    first = clean_env / "first" / f"models--{REPO.replace('/', '--')}"
    (first / "refs").mkdir(parents=True)
    (first / "refs" / "main").write_text(COMMITS["main"])
    snap = write_snapshot(clean_env / "home2" / "hub", REPO, COMMITS["main"], hf_folders["main"], "main")
    monkeypatch.setenv("HF_HUB_CACHE", str(clean_env / "first"))
    monkeypatch.setenv("HF_HOME", str(clean_env / "home2"))
    assert resolve_checkpoint(REPO) == snap
    monkeypatch.delenv("HF_HOME")
    with pytest.raises(CheckpointError, match=r"has .*first.* but no snapshot for revision 'main'.*snapshots: none"):
        resolve_checkpoint(REPO)
