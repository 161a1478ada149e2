"""The fine-tuning helpers every backend shares (models/finetune.py)."""

import pytest
from torch import nn

from videotuna_dpo.errors import UserError
from videotuna_dpo.models.finetune import dtype_setting, eval_mode


def test_eval_mode_restores_every_submodule_to_its_own_mode():
    # As a diffusers model after add_adapter: the loaded base in eval mode, the new adapter layers in train mode.
    base, adapter = nn.Linear(2, 2).eval(), nn.Dropout(0.1)
    net, other = nn.Sequential(base, adapter), nn.Linear(2, 2)
    net.training = True
    with eval_mode(net, other):
        assert [m.training for m in (net, base, adapter, other)] == [False, False, False, False]
    assert [m.training for m in (net, base, adapter, other)] == [True, False, True, True]


def test_dtype_setting_names_the_key_and_the_choices():
    assert str(dtype_setting("model.reference_dtype", "bf16")) == "torch.bfloat16"
    with pytest.raises(UserError) as err:
        dtype_setting("model.reference_dtype", "bfloat16")
    assert str(err.value) == "model.reference_dtype must be one of fp32, bf16, fp16, got 'bfloat16'"
