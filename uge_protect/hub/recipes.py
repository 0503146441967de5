"""Loading recipes the dataset card and the README show: open_clip's trainer on the shards, and
a PyTorch classifier on a ``webdataset`` pipeline (both run as written in the tests)."""

from __future__ import annotations


def pytorch_recipe(urls: str, image_ext: str, num_classes: int, image_size: int | None) -> str:
    """The PyTorch classifier recipe of the card and the README: a ``webdataset`` pipeline in a
    ``torch.utils.data.DataLoader``, and a training loop."""
    if image_size:
        crop = f"transforms.RandomCrop({image_size}, padding={max(1, image_size // 8)}),"
    else:
        crop = "transforms.RandomResizedCrop(224),  # images of several sizes: make them one size"
    return f'''import torch
import webdataset as wds
from torchvision import transforms

urls = "{urls}"
augment = transforms.Compose([
    {crop}
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
])
dataset = (
    wds.WebDataset(urls, shardshuffle=100, nodesplitter=wds.split_by_node)
    .shuffle(1000)
    .decode("pil")
    .to_tuple("{image_ext}", "cls")
    .map_tuple(augment, int)
)
loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=2)

model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, {num_classes}),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for epoch in range(1):
    for images, labels in loader:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
'''


def open_clip_command(train_data: str, n_shards: int) -> str:
    """open_clip's own training entry point on the shards; it reads ``sizes.json`` by itself."""
    workers = max(1, min(4, n_shards))
    return (f"python -m open_clip_train.main --dataset-type webdataset \\\n"
            f"    --train-data '{train_data}' \\\n"
            f"    --model RN50 --batch-size 256 --workers {workers} --epochs 32")


