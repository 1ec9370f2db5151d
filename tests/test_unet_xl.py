"""The SDXL UNet (addition_embed_type "text_time": pooled text + micro-conditioning time ids, per-block
transformer depth, head dim 64 at full size) against diffusers' UNet2DConditionModel on the same saved weights,
at tiny base-like and refiner-like configs; and the errors a wrong added conditioning gets."""
import pytest
import torch

import sdcore
from sdcore import embedded
from sdcore.models import UNet2DConditionModel

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency: `make test` installs it")

XL = dict(addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True,
          norm_num_groups=8, sample_size=8, layers_per_block=2)
CONFIGS = {
    # SDXL base's layout: no attention at the top resolution, deeper transformers further down, 6 time ids
    # (pooled width 16 + 6 x 8).
    "base": dict(XL, block_out_channels=(16, 32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                           "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 3), attention_head_dim=(1, 2, 4), cross_attention_dim=32,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
    # The refiner's: four stages, attention in the middle two only, one depth for all, 5 time ids.
    "refiner": dict(XL, block_out_channels=(24, 48, 48, 48), layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=2, attention_head_dim=(2, 4, 4, 4), cross_attention_dim=24,
                    projection_class_embeddings_input_dim=24 + 5 * 8),
}
N_IDS = {"base": 6, "refiner": 5}
# stabilityai/stable-diffusion-xl-refiner-1.0's unet/config.json (the base's is the embedded sdxl arch's).
REFINER = dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=(6, 12, 24, 24),
               block_out_channels=(384, 768, 1536, 1536), cross_attention_dim=1280, layers_per_block=2,
               down_block_types=CONFIGS["refiner"]["down_block_types"],
               up_block_types=CONFIGS["refiner"]["up_block_types"], projection_class_embeddings_input_dim=2560,
               transformer_layers_per_block=4, use_linear_projection=True, sample_size=128)


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**CONFIGS[request.param]).eval()
    with torch.no_grad():  # random init leaves norms at identity and proj_out at zero: perturb everything
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp(f"unet_xl_{request.param}")
    ref.save_pretrained(path, safe_serialization=True)
    return request.param, ref, path


def _inputs(name, batch=2, h=8, w=6, seed=0):
    cfg, g = CONFIGS[name], torch.Generator().manual_seed(seed)
    pooled = cfg["projection_class_embeddings_input_dim"] - N_IDS[name] * cfg["addition_time_embed_dim"]
    ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0][:N_IDS[name] - 1] + [6.0]] * batch)
    ids[1:] += 64.0  # every sample its own ids: a mixed-up row would show
    return (torch.randn(batch, 4, h, w, generator=g), torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g),
            {"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": ids})


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_matches_diffusers(saved, backend):
    name, ref, path = saved
    unet = UNet2DConditionModel.from_pretrained(path)
    x, context, added = _inputs(name)
    with torch.no_grad():
        want = ref(x, torch.tensor([10, 700]), context, added_cond_kwargs=added).sample
        with sdcore.use_backend(backend):
            got = unet(x, torch.tensor([10, 700]), context, added_cond_kwargs=added)
        # the added embedding matters: other time ids give another prediction
        other = unet(x, torch.tensor([10, 700]), context,
                     added_cond_kwargs={**added, "time_ids": added["time_ids"] * 0.5})
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    assert err <= 1e-4, err
    assert (other - got).abs().max() > 1e-3


def _full(config):
    with torch.device("meta"):
        want = diffusers.UNet2DConditionModel(**config).state_dict()
        got = UNet2DConditionModel.from_config(config).state_dict()
    return {k: v.shape for k, v in got.items()}, {k: v.shape for k, v in want.items()}


@pytest.mark.parametrize("config", [embedded.CONFIGS["sdxl"]["unet"], REFINER], ids=["base", "refiner"])
def test_real_sizes_have_diffusers_parameters(config):
    """Every parameter name and shape of the real SDXL base / refiner UNets (meta device: no memory), and the
    head dim 64 of every attention."""
    got, want = _full(config)
    assert got == want
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    dims = {m.to_q.out_features // m.heads for m in unet.modules() if hasattr(m, "to_q") and hasattr(m, "heads")}
    assert dims == {64}


@pytest.mark.parametrize("saved", ["refiner"], indirect=True)
def test_wrong_number_of_time_ids_is_named(saved):
    _, _, path = saved
    unet = UNet2DConditionModel.from_pretrained(path)
    x, context, added = _inputs("refiner")
    six = torch.cat([added["time_ids"], added["time_ids"][:, :1]], dim=1)
    with pytest.raises(ValueError, match=r"6 time_ids .* projection_class_embeddings_input_dim is 64 .*refiner"):
        unet(x, 10, context, added_cond_kwargs={**added, "time_ids": six})


@pytest.mark.parametrize("added, match", [
    (None, r"needs added_cond_kwargs=\{'text_embeds'"),
    ({"text_embeds": torch.zeros(2, 24)}, r"needs added_cond_kwargs.*got \['text_embeds'\]"),
    ({"text_embeds": torch.zeros(1, 24), "time_ids": torch.zeros(2, 5)}, r"\['text_embeds'\] must be a \[2, n\]"),
    ({"text_embeds": torch.zeros(2, 24), "time_ids": torch.zeros(10)}, r"\['time_ids'\] must be a \[2, n\]"),
])
def test_bad_added_cond_kwargs_are_named(added, match):
    unet = UNet2DConditionModel.from_config(CONFIGS["refiner"])
    x, context, _ = _inputs("refiner")
    with pytest.raises(ValueError, match=match):
        unet(x, 10, context, added_cond_kwargs=added)


@pytest.mark.parametrize("key, value", [("addition_time_embed_dim", None),
                                        ("projection_class_embeddings_input_dim", "64")])
def test_text_time_needs_its_sizes(key, value):
    with pytest.raises(ValueError, match=f"needs {key} to be a positive integer"):
        UNet2DConditionModel.from_config(dict(CONFIGS["base"], **{key: value}))
