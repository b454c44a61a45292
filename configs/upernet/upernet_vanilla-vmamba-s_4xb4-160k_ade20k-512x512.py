# Vanilla-VMamba-S UperNet, ADE20K 160k (official: 76M, 1081G, mIoU 49.5 / 50.5 MS).
_base_ = "./upernet_vmamba-t_4xb4-160k_ade20k-512x512.py"

model = dict(
    backbone=dict(
        arch="vanilla-small",
        drop_path_rate=0.3,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v0cls/vssmsmall_dp03_ckpt_epoch_238.pth")))
