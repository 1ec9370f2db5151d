"""CUDA graphs of the UNet call (sdcore/pipelines/cuda_graphs.py): the cache's bounds and switches on any machine;
on a GPU, capture and replay bitwise equal to eager over timesteps and inputs, recapture at a new shape or after
the weights move, a LoRA merged after capture, and whole generations with graphs on and off."""
import pytest
import torch

from sdcore import cli, embedded
from sdcore.pipelines.cuda_graphs import LRU, UNetGraphs

from conftest import devices

CUDA = [d for d in devices() if getattr(d, "values", [d])[0] == "cuda"]


def test_lru_keeps_the_most_recent_and_refreshes_on_get():
    cache = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.keys() == ["a", "c"] and "b" not in cache and len(cache) == 2
    cache.put("a", 4)
    cache.put("d", 5)
    assert cache.keys() == ["a", "d"] and cache.get("a") == 4 and cache.get("c") is None
    cache.clear()
    assert len(cache) == 0
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="capacity must be a positive int"):
            LRU(bad)


def test_the_switch_is_on_by_default_and_only_used_on_cuda():
    pipe = embedded.build("tiny")
    assert pipe.cuda_graphs is True
    assert pipe._unet_call() is pipe.unet  # on the CPU the UNet runs as it is
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        type(pipe)(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, cuda_graphs="no")
    off = type(pipe)(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, cuda_graphs=False)
    assert off.cuda_graphs is False
    from sdcore.pipelines import StableDiffusionImg2ImgPipeline

    assert StableDiffusionImg2ImgPipeline.from_pipe(off).cuda_graphs is False
    assert cli.load_pipeline(None, "tiny", "cpu", torch.float32, None, cuda_graphs=False).cuda_graphs is False
    args = cli.build_parser().parse_args(["generate", "x", "--no-cuda-graphs"])
    assert args.no_cuda_graphs is True


# ---------------------------------------------------------------------------------------------- on a GPU
def _inputs(pipe, batch, size, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g)
    return x.cuda().half(), text.cuda().half()


@pytest.mark.parametrize("device", CUDA)
def test_replay_is_bitwise_eager_over_timesteps_inputs_and_shapes(device):
    pipe = embedded.build("tiny", device=device, dtype=torch.float16)
    graphs = UNetGraphs(pipe.unet, capacity=2)
    with torch.no_grad():
        for seed, t in ((0, 999.0), (1, 500.0), (2, 1.0), (3, 250.5)):
            x, text = _inputs(pipe, 2, 16, seed)
            got = graphs(x, torch.tensor(t), text)
            want = pipe.unet(x, torch.tensor(t, device=device).expand(2), text)
            assert torch.equal(got, want), (seed, t)
        assert len(graphs.graphs) == 1 and graphs.disabled is None
        for size in (24, 32):  # new shapes: new graphs, the oldest evicted at capacity 2
            x, text = _inputs(pipe, 2, size, 5)
            assert torch.equal(graphs(x, 10.0, text), pipe.unet(x, torch.full((2,), 10.0, device=device), text))
        assert len(graphs.graphs) == 2
        pipe.to(dtype=torch.float32)  # the weights move: the graphs are recaptured on the new storage
        x, text = (a.float() for a in _inputs(pipe, 2, 16, 6))
        assert torch.equal(graphs(x, 7.0, text), pipe.unet(x, torch.full((2,), 7.0, device=device), text))


@pytest.mark.parametrize("device", CUDA)
def test_a_lora_merged_after_capture_is_what_the_graph_computes(device):
    pipe = embedded.build("tiny", device=device, dtype=torch.float16)
    graphs = pipe._unet_call()
    assert isinstance(graphs, UNetGraphs)
    x, text = _inputs(pipe, 2, 16, 0)
    t = torch.tensor(400.0)
    with torch.no_grad():
        before = graphs(x, t, text)
        attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        g = torch.Generator().manual_seed(1)
        sd = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
              torch.randn(4, attn.to_q.weight.shape[1], generator=g),
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
              torch.randn(attn.to_q.weight.shape[0], 4, generator=g)}
        pipe.load_lora_weights(sd)
        after = graphs(x, t, text)
        assert len(graphs.graphs) == 1  # replayed, not recaptured
        assert not torch.equal(after, before)
        assert torch.equal(after, pipe.unet(x, t.to(device).expand(2), text))


@pytest.mark.parametrize("device", CUDA)
def test_generations_with_and_without_graphs_are_bitwise_equal(device):
    pipe = embedded.build("tiny", device=device, dtype=torch.float16)
    kw = dict(height=64, width=64, num_inference_steps=4, seed=3, output_type="np", progress=False)
    with_graphs = pipe("a red car", **kw).images
    pipe.cuda_graphs = False
    assert (with_graphs == pipe("a red car", **kw).images).all()


def test_a_failed_capture_warns_once_and_runs_eagerly(caplog):
    """Capture fails for real where there is no CUDA (here: on the CPU): the call still returns the eager
    output, the cache says why it is off, warns once, and later calls run eagerly without trying again."""
    import logging

    pipe = embedded.build("tiny")
    graphs = UNetGraphs(pipe.unet)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, pipe.unet.config.cross_attention_dim,
                                                                 generator=g)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="sdcore"):
        got = graphs(x, 500, text)
        again = graphs(x, 250.0, text)
        want = pipe.unet(x, torch.tensor([500.0, 500.0]), text)
        want_again = pipe.unet(x, torch.tensor([250.0, 250.0]), text)
    assert torch.equal(got, want) and torch.equal(again, want_again)
    assert graphs.disabled is not None and "capture failed" in graphs.disabled and len(graphs.graphs) == 0
    warnings = [r for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    assert len(warnings) == 1 and "--no-cuda-graphs" in warnings[0].getMessage()
