"""The paper's training recipe pieces shared by the app's trainer and the experiments."""

from monai.transforms import Compose, EnsureTyped, RandAffined


def augmentation(image_size: int, augment_range: float = 0.2) -> list:
    """Random rotation (rad), shift (fraction of the size) and shear, each within +-augment_range, no flips.

    The paper trains with Keras' rotation/width/height/shear ranges of 0.2 and vertical flips disabled;
    borders are filled with the nearest pixel as Keras' default does."""
    r = augment_range
    return [
        EnsureTyped(keys=("image", "label"), track_meta=False),
        RandAffined(
            keys=("image", "label"),
            prob=1.0,
            rotate_range=r,
            translate_range=(r * image_size, r * image_size),
            shear_range=(r, r),
            mode=("bilinear", "nearest"),
            padding_mode="border",
        ),
    ]


def augment(image_size: int, augment_range: float = 0.2) -> Compose:
    return Compose(augmentation(image_size, augment_range))
