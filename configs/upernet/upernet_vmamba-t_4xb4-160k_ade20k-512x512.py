# UperNet with a VMamba-T[s1l8] backbone, ADE20K 512x512, 160k iterations (official: 62M params,
# 949G FLOPs at 512x2048, mIoU 47.9 single-scale / 48.8 multi-scale).
# The recipe is mmseg's Swin UperNet one, as in the official VMamba segmentation configs: AdamW
# (lr 6e-5, betas (0.9, 0.999), weight decay 0.01, none for "norm" parameters), linear warm-up over
# 1500 iterations then poly decay (power 1) to 0. Official runs use 4 GPUs x 4 images = 16 per batch.
# Base of every other config in this folder.
_base_ = "mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py"

custom_imports = dict(imports=["vmamba_mm"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type="VMamba",
        arch="tiny",
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        # ImageNet-1K checkpoint; downloaded on first use, or put a local copy's path here.
        init_cfg=dict(type="Pretrained",
                      checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth")),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))

train_dataloader = dict(batch_size=4)

# Seeded, so runs repeat and --resume continues bit-exactly (the hook below saves every rank's
# random-number states in each checkpoint; vmamba_mm/engine/resume.py). diff_rank_seed: rank r
# seeds its generators with seed + r, so the GPUs draw independent flips, crops and drop paths
# instead of identical ones; the samplers still share one seed and split the data without overlap.
randomness = dict(seed=0, diff_rank_seed=True)
custom_hooks = [dict(type="ExactResumeHook")]
