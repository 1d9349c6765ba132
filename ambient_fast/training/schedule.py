"""Learning-rate schedules.

EDM2's (Karras et al. 2024, equation 18; NVlabs/edm2 `learning_rate_schedule`): a linear ramp-up over
the first `rampup_images`, then the reference rate until `ref_batches` batches, then decay as the
inverse square root of the training time:

    lr(t) = ref_lr * min(t / rampup_images, 1) / sqrt(max(t / (ref_batches * batch), 1)),  t in images.

Magnitude-preserving networks with forced weight normalisation have no effective-learning-rate decay of
their own, so the schedule has to provide it. EDM2's presets use ramp-up 10 M images, batch 2048, and
(ref_lr, ref_batches) = (0.0100, 70000) for ImageNet-512 S in latents, (0.0100, 35000) for ImageNet-64 S
in pixels (larger networks: lower ref_lr), with Adam betas (0.9, 0.99).
"""


def edm2_learning_rate(images_seen: float, batch: int, ref_lr: float, ref_batches: float,
                       rampup_images: float = 10e6) -> float:
    """EDM2's learning rate after `images_seen` images in batches of `batch` (module docstring);
    ref_batches = 0 turns the decay off, rampup_images = 0 the ramp-up."""
    if batch < 1 or ref_lr <= 0 or ref_batches < 0 or rampup_images < 0:
        raise ValueError(f"need batch >= 1, ref_lr > 0, ref_batches >= 0 and rampup_images >= 0; got {batch}, "
                         f"{ref_lr}, {ref_batches}, {rampup_images}")
    lr = ref_lr
    if ref_batches > 0:
        lr /= max(images_seen / (ref_batches * batch), 1.0) ** 0.5
    if rampup_images > 0:
        lr *= min(images_seen / rampup_images, 1.0)
    return lr
