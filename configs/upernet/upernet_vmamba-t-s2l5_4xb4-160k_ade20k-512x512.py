# VMamba-T[s2l5] UperNet, ADE20K 160k (official: 62M, 948G, mIoU 48.3 / 48.6 MS).
_base_ = "./upernet_vmamba-t_4xb4-160k_ade20k-512x512.py"

model = dict(
    backbone=dict(
        arch="tiny-s2l5",
        drop_path_rate=0.2,
        init_cfg=dict(checkpoint="https://github.com/MzeroMiko/VMamba/releases/download/"
                                 "%23v2cls/vssm_tiny_0230_ckpt_epoch_262.pth")))
