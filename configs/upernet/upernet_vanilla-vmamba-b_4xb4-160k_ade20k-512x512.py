# Vanilla-VMamba-B UperNet, ADE20K 160k (official: 110M, 1226G, mIoU 50.0 / 51.3 MS).
# The official config points at an unreleased "dp05" ImageNet checkpoint; the released one is dp06.
_base_ = "./upernet_vmamba-t_4xb4-160k_ade20k-512x512.py"

model = dict(
    backbone=dict(
        arch="vanilla-base",
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v0cls/vssmbase_dp06_ckpt_epoch_241.pth")),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
