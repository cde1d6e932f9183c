"""loading.load_pipeline: int8 layers built while a saved folder's weights stream in (tiny model, CPU).

The reference is what it replaces: `from_pretrained` followed by `int8.quantize_model` with accelerate's layer
choice. Both feed the same float values to the same `Int8Linear.from_linear`, so everything is compared bitwise.
"""
import json

import pytest
import torch
from diffusers import PixArtAlphaPipeline
from safetensors.torch import load_file, save_file
from torch import nn

from tiled_diffusion.model import int8 as I
from tiled_diffusion.pipeline import loading
from tiled_diffusion.pipeline.loading import LoadError
from tiled_diffusion.pipeline.loading import iter_safetensors
from tiled_diffusion.pipeline.loading import load_pipeline
from tests.helpers import save_tiny_folder

PROMPT = "a photo of a red house by the lake"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    single = save_tiny_folder(root / "single")
    sharded = save_tiny_folder(root / "sharded", max_shard_size="20KB")  # 4-6 shards per model
    assert (sharded / "text_encoder" / "model.safetensors.index.json").exists()
    assert (sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    return {"single": single, "sharded": sharded}


def reference(folder, dtype):
    ref = PixArtAlphaPipeline.from_pretrained(str(folder), dtype=dtype)
    I.quantize_model(ref.text_encoder, mode="w8a16", exclude=())
    I.quantize_model(ref.transformer, mode="w8a8", exclude=I.PIXART_KEEP_HIGH_PRECISION)
    for m in ref.transformer.modules():  # load_pipeline is inference-only: W8A8 layers keep just the packed copy
        if isinstance(m, I.Int8Linear):
            m.pack_only_()
    return ref


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not bad, bad
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    buf_a = {n: t for n, t in a.named_buffers()}
    buf_b = {n: t for n, t in b.named_buffers()}  # non-persistent ones too (PatchEmbed's pos_embed)
    assert buf_a.keys() == buf_b.keys()
    assert all(buf_a[n].dtype == buf_b[n].dtype and torch.equal(buf_a[n], buf_b[n]) for n in buf_a)


@pytest.mark.parametrize("layout,dtype", [("single", torch.bfloat16), ("sharded", torch.bfloat16),
                                          ("single", torch.float32), ("sharded", torch.float16)])
def test_same_modules_as_quantized_from_pretrained(folders, layout, dtype):
    """fp16 also covers T5's `_keep_in_fp32_modules` (wo is read in fp32 before it is quantized)."""
    pipe = load_pipeline(str(folders[layout]), dtype, "w8a8")
    ref = reference(folders[layout], dtype)
    assert_same_state(pipe.text_encoder, ref.text_encoder)
    assert_same_state(pipe.transformer, ref.transformer)
    assert type(pipe) is PixArtAlphaPipeline
    assert type(pipe.tokenizer) is type(ref.tokenizer) and type(pipe.scheduler) is type(ref.scheduler)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_outputs_bitwise_equal(folders, layout):
    pipe = load_pipeline(str(folders[layout]), torch.bfloat16, "w8a8")
    ref = reference(folders[layout], torch.bfloat16)
    tok = ref.tokenizer(PROMPT, padding="max_length", max_length=120, truncation=True, return_tensors="pt")
    with torch.no_grad():
        e = pipe.text_encoder(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        e_ref = ref.text_encoder(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        assert torch.equal(e, e_ref)
        x = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(0)).bfloat16()
        kw = dict(encoder_hidden_states=e.expand(2, -1, -1), encoder_attention_mask=tok.attention_mask.expand(2, -1),
                  timestep=torch.tensor([999, 500]), return_dict=False)
        assert torch.equal(pipe.transformer(x, **kw)[0], ref.transformer(x, **kw)[0])


def test_linears_are_int8_where_expected(folders):
    pipe = load_pipeline(str(folders["sharded"]), torch.bfloat16, "w8a8")
    te, tr = pipe.text_encoder, pipe.transformer
    assert not any(type(m) is nn.Linear for m in te.modules())
    assert {m.mode for m in te.modules() if isinstance(m, I.Int8Linear)} == {"w8a16"}
    assert te.shared.weight is te.encoder.embed_tokens.weight  # the tie survives the load
    for name, m in tr.named_modules():
        if isinstance(m, (nn.Linear, I.Int8Linear)):
            keep = I._matches(name, I.PIXART_KEEP_HIGH_PRECISION)
            assert type(m) is (nn.Linear if keep else I.Int8Linear), name
            assert keep or m.mode == "w8a8"
    assert not any(t.is_meta for t in list(tr.parameters()) + list(tr.buffers()))


def test_int8_none_is_plain_from_pretrained(folders):
    pipe = load_pipeline(str(folders["single"]), torch.bfloat16, None)
    assert not any(isinstance(m, I.Int8Linear) for m in pipe.transformer.modules())
    assert pipe.transformer.dtype == torch.bfloat16


@pytest.mark.parametrize("int8", ["w8a8", None])
def test_components_load_alone(folders, int8):
    """generate's two stages: the text encoder alone, then the rest; what is not asked for is None."""
    text = load_pipeline(str(folders["single"]), torch.bfloat16, int8, ("tokenizer", "text_encoder"))
    assert text.transformer is None and text.vae is None and text.text_encoder is not None
    assert any(isinstance(m, I.Int8Linear) for m in text.text_encoder.modules()) == (int8 is not None)
    rest = load_pipeline(str(folders["single"]), torch.bfloat16, int8, ("transformer", "vae", "scheduler"))
    assert rest.text_encoder is None and rest.tokenizer is None and rest.transformer is not None
    with pytest.raises(ValueError, match="unknown components"):
        load_pipeline(str(folders["single"]), torch.bfloat16, int8, ("unet",))


def test_no_float_copy_of_the_model_is_ever_whole(folders, monkeypatch):
    """Each layer is swapped as soon as its weight and bias are read: while the files stream, at most one layer to
    be quantized holds float weights (the one whose bias or weight is still to come)."""
    built, peaks = [], []
    real_build, real_iter = loading._build, loading.iter_safetensors

    def build(*a, **k):
        built.append(real_build(*a, **k))
        return built[-1]

    def pending():
        model = built[-1]
        keep = I.PIXART_KEEP_HIGH_PRECISION if hasattr(model, "transformer_blocks") else ()
        return sum(1 for n, m in model.named_modules()
                   if type(m) is nn.Linear and not m.weight.is_meta and not I._matches(n, keep))

    def iterate(*a, **k):
        for item in real_iter(*a, **k):
            peaks.append(pending())
            yield item
        peaks.append(pending())

    monkeypatch.setattr(loading, "_build", build)
    monkeypatch.setattr(loading, "iter_safetensors", iterate)
    load_pipeline(str(folders["sharded"]), torch.bfloat16, "w8a8")
    assert len(built) == 2 and peaks and max(peaks) <= 1


def test_iter_safetensors_reads_what_safetensors_wrote(tmp_path):
    tensors = {"bf16": torch.randn(3, 5).bfloat16(), "f16": torch.randn(7).half(), "f32": torch.randn(2, 3, 4),
               "i64": torch.arange(-5, 6), "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    got = dict(iter_safetensors(path))
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    assert sorted(dict(iter_safetensors(path, ["i8", "nope", "f32"]))) == ["f32", "i8"]  # unknown names skipped


def _edit_transformer_checkpoint(folder, edit):
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path))


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("proj_out.weight"), r"1 missing: proj_out\.weight"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)), r"1 unexpected: extra\.weight"),
    (lambda sd: sd.__setitem__("proj_out.bias", torch.zeros(3)), r"mis-shaped: proj_out\.bias: checkpoint \(3,\)"),
])
def test_checkpoint_mismatch_is_a_clear_error(tmp_path, edit, match):
    folder = save_tiny_folder(tmp_path / "broken")
    _edit_transformer_checkpoint(folder, edit)
    with pytest.raises(LoadError, match=match):
        load_pipeline(str(folder), torch.bfloat16, "w8a8")


def test_checkpoint_mismatch_through_the_cli_is_one_line(tmp_path, capsys):
    from tiled_diffusion.cli import commands as cli

    folder = save_tiny_folder(tmp_path / "broken")
    _edit_transformer_checkpoint(folder, lambda sd: sd.pop("proj_out.weight"))
    out = tmp_path / "x.png"
    rc = cli.main(["generate", "--prompt", "x", "--model", str(folder), "--size", "256x128", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert "missing: proj_out.weight" in err[-1] and err[-1].startswith("tiled-diffusion generate: error:")
