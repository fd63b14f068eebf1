"""LightningDataModules: class folders, Fashion-MNIST, synthetic patterns (and face data, see kdx.data.face)."""
from kdx.data.base import KdxDataModule
from kdx.data.fashion_mnist import FashionMNISTDataModule
from kdx.data.image_folder import ImageFolderDataModule, stratified_split
from kdx.data.images import IMAGE_EXTENSIONS, decode_image, list_identity_folder, open_image, scan_class_folders
from kdx.data.synthetic import SyntheticDataModule, make_synthetic_images

__all__ = [
    "IMAGE_EXTENSIONS", "FashionMNISTDataModule", "ImageFolderDataModule", "KdxDataModule", "SyntheticDataModule",
    "decode_image", "list_identity_folder", "make_synthetic_images", "open_image", "scan_class_folders",
    "stratified_split",
]
