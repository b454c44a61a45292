# Vanilla-VMamba-T UperNet, ADE20K 160k (official: 55M, 964G, mIoU 47.3 / 48.3 MS).
# The official vanilla seg configs leave drop_path_rate to the Swin base config: 0.3 for T, S and B.
_base_ = "./upernet_vmamba-t_4xb4-160k_ade20k-512x512.py"

model = dict(
    backbone=dict(
        arch="vanilla-tiny",
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth")))
