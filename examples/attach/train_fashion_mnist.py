"""Ray Train's own Fashion-MNIST example (``ray/train/examples/pytorch/torch_fashion_mnist_example.py``, Ray 2.60)
with the batch-size bound: the three lines marked ``# raygd`` are all that changed in the loop.

    python examples/attach/train_fashion_mnist.py                       # 2 workers, 10 epochs, as Ray's
    python examples/attach/train_fashion_mnist.py --epochs 1
    python examples/attach/train_fashion_mnist.py --smoke-test          # synthetic images, seconds

Besides the three lines: the data is read from Debian's ``dataset-fashion-mnist`` package where it is
installed (torchvision wants the idx files decompressed, so they are unpacked into ``~/data`` once), else
downloaded as Ray's example does; tqdm's progress bars are left out; rank 0 prints each epoch's report and,
at the end, the exact B_D on 2,048 training examples (``probe.exact``) beside the online one.

Output of ``--epochs 1`` (2 CPU workers, global batch 32, load average ~14 on 2 cores: other jobs ran)::

    epoch 0: loss 0.5125 accuracy 0.8152 B_D 53.3 ± 9.4 (B_noise 52.3, 12 of 1875 updates measured ...)
    exact B_D on 2048 training examples at the final weights: 41.1 (online 53.3 ± 9.4)

(the measured output is in examples/attach/README.md). ``diversity/batch_bound`` is B_D = 1 + B_noise of the
gradient as trained (dropout on); ``probe.exact`` is in eval mode (dropout off), so the two differ by more than
the online estimate's noise when dropout adds its own.
"""

import argparse
import gzip
import os
import shutil
from pathlib import Path

import ray.train
import torch
from filelock import FileLock
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import datasets, transforms
from torchvision.transforms import Normalize, ToTensor

import raygd  # raygd

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fashion_mnist_root() -> tuple[str, bool]:
    """(root, download): Debian's files unpacked into ~/data/FashionMNIST/raw, or torchvision's download."""
    root = Path("~/data").expanduser()
    if not DEBIAN_FASHION_MNIST.is_dir():
        return str(root), True
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        if not (raw / name).exists():
            with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz", "rb") as src, open(raw / f"{name}.tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            (raw / f"{name}.tmp").replace(raw / name)
    return str(root), False


def get_datasets(smoke_test: bool):
    if smoke_test:  # synthetic images of the same shape: no data needed
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g)
        return TensorDataset(x, y), TensorDataset(x[:128], y[:128])
    # Transform to normalize the input images
    transform = transforms.Compose([ToTensor(), Normalize((0.28604,), (0.32025,))])
    with FileLock(os.path.expanduser("~/data.lock")):
        root, download = fashion_mnist_root()
        training_data = datasets.FashionMNIST(root=root, train=True, download=download, transform=transform)
        test_data = datasets.FashionMNIST(root=root, train=False, download=download, transform=transform)
    return training_data, test_data


def get_dataloaders(batch_size, smoke_test=False):
    training_data, test_data = get_datasets(smoke_test)
    # Create data loaders
    train_dataloader = DataLoader(training_data, batch_size=batch_size, shuffle=True)
    test_dataloader = DataLoader(test_data, batch_size=batch_size)
    return train_dataloader, test_dataloader


# Model Definition
class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(512, 10),
            nn.ReLU(),
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


def train_func_per_worker(config: dict):
    ray.train.torch.enable_reproducibility()

    lr = config["lr"]
    epochs = config["epochs"]
    batch_size = config["batch_size_per_worker"]

    # Get dataloaders inside the worker training function
    train_dataloader, test_dataloader = get_dataloaders(batch_size=batch_size, smoke_test=config.get("smoke_test"))

    # [1] Prepare Dataloader for distributed training
    # Shard the datasets among workers and move batches to the correct device
    # =======================================================================
    train_dataloader = ray.train.torch.prepare_data_loader(train_dataloader)
    test_dataloader = ray.train.torch.prepare_data_loader(test_dataloader)

    model = NeuralNetwork()

    # [2] Prepare and wrap your model with DistributedDataParallel
    # Move the model to the correct GPU/CPU device
    # ============================================================
    model = ray.train.torch.prepare_model(model)
    probe = raygd.attach(model, n=len(train_dataloader.dataset))  # raygd

    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    rank = ray.train.get_context().get_world_rank()

    # Model training loop
    for epoch in range(epochs):
        if ray.train.get_context().get_world_size() > 1:
            # Required for the distributed sampler to shuffle properly across epochs.
            train_dataloader.sampler.set_epoch(epoch)

        model.train()
        for X, y in train_dataloader:
            pred = model(X)
            loss = loss_fn(pred, y)

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        model.eval()
        test_loss, num_correct, num_total = 0, 0, 0
        with torch.no_grad():
            for X, y in test_dataloader:
                pred = model(X)
                loss = loss_fn(pred, y)

                test_loss += loss.item()
                num_total += y.shape[0]
                num_correct += (pred.argmax(1) == y).sum().item()

        test_loss /= len(test_dataloader)
        accuracy = num_correct / num_total

        # [3] Report metrics to Ray Train
        # ===============================
        metrics = {"loss": test_loss, "accuracy": accuracy, **probe.metrics()}  # raygd
        ray.train.report(metrics=metrics)
        if rank == 0:
            bound, se = metrics["diversity/batch_bound"], metrics["diversity/batch_bound_se"]
            measured, updates = metrics["diversity/measured_updates"], len(train_dataloader) * (epoch + 1)
            print(
                f"epoch {epoch}: loss {test_loss:.4f} accuracy {accuracy:.4f} B_D {bound:.1f} ± {se:.1f} "
                f"(B_noise {metrics['diversity/noise_scale']:.1f}, {measured:.0f} of {updates} updates measured, "
                f"AdaScale gain {metrics['diversity/adascale_gain']:.1f})",
                flush=True,
            )

    exact = probe.exact(train_dataloader, max_examples=2048)
    if rank == 0:
        print(
            f"exact B_D on {exact.n} training examples at the final weights: {exact.batch_bound:.1f} "
            f"(online {metrics['diversity/batch_bound']:.1f} ± {metrics['diversity/batch_bound_se']:.1f})",
            flush=True,
        )


def train_fashion_mnist(num_workers=2, use_gpu=False, epochs=10, smoke_test=False):
    global_batch_size = 32

    train_config = {
        "lr": 1e-3,
        "epochs": epochs,
        "batch_size_per_worker": global_batch_size // num_workers,
        "smoke_test": smoke_test,
    }

    # Configure computation resources
    scaling_config = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu)

    # Initialize a Ray TorchTrainer
    trainer = TorchTrainer(
        train_loop_per_worker=train_func_per_worker,
        train_loop_config=train_config,
        scaling_config=scaling_config,
    )

    # [4] Start distributed training
    # Run `train_func_per_worker` on all workers
    # =============================================
    result = trainer.fit()
    print(f"Training result: {result}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--smoke-test", action="store_true", help="512 synthetic images, 2 epochs, local Ray")
    args = parser.parse_args()
    if args.smoke_test:
        ray.init(address="local", num_cpus=args.num_workers)
        args.epochs = 2
    train_fashion_mnist(args.num_workers, args.use_gpu, args.epochs, args.smoke_test)
