# VMamba-T[s1l8] UperNet, ADE20K 160k, with layer-wise learning-rate decay (not an official
# recipe; no official number). Each of the 14 blocks (depths 2, 2, 8, 2) trains at 0.9x the lr of
# the block above it, the stem at 0.9^15 ~ 0.21x, the neck and heads at the full lr. Weight decay
# is off for norms, biases, A_logs, Ds and dt_projs_bias (see vmamba_mm/engine/layer_decay.py).
_base_ = "./upernet_vmamba-t_4xb4-160k_ade20k-512x512.py"

optim_wrapper = dict(
    constructor="VMambaLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(
        _delete_=True, decay_rate=0.9, decay_type="layer_wise", num_layers=14))
