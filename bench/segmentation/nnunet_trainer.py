"""A fixed wall-clock budget variant of nnU-Net v2's default trainer (copied into the benchmark's own venv).

nnU-Net finds trainer classes only inside its own package, so ``run.py`` copies this file to
``nnunetv2/training/nnUNetTrainer/variants/benchmarking/nnUNetTrainer_MedlensBench.py`` in the benchmark venv.
It changes only the training length, nothing about the method:

* epochs are short (``BENCH_ITERS_PER_EPOCH`` training and ``BENCH_VAL_ITERS`` pseudo-Dice iterations instead
  of 250 and 50), so the trainer completes epochs and checkpoints on a CPU;
* after each epoch it re-estimates how many more epochs fit before ``BENCH_DEADLINE`` (a Unix time) from the
  last epoch's duration, sets ``num_epochs`` accordingly and stretches the poly learning-rate schedule to it
  (so the learning rate decays over the budget, as it would over 1000 epochs), and stops when none fit;
  the first epoch always runs;
* the final validation of the whole validation cases (sliding window with mirroring) is skipped: it is an
  evaluation, not training, and the benchmark evaluates every peer on the test cases with one metric function;
* it writes what it did (iterations, batch and patch size, seconds) to ``BENCH_SUMMARY`` as JSON.

Everything else (network, patch and batch size, augmentation, loss, optimiser, deep supervision, data loading
workers) is nnU-Net's default for the configuration.
"""

import json
import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_MedlensBench(nnUNetTrainer):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = int(os.environ.get("BENCH_ITERS_PER_EPOCH", "5"))
        self.num_val_iterations_per_epoch = int(os.environ.get("BENCH_VAL_ITERS", "1"))
        self.num_epochs = 1000
        self.bench_deadline = float(os.environ.get("BENCH_DEADLINE", time.time() + 600))
        self.bench_summary = os.environ.get("BENCH_SUMMARY")
        self.bench_train_iterations = 0
        self.bench_val_iterations = 0

    def run_training(self):
        started = time.time()
        self.on_train_start()
        first_epoch = time.time()
        epoch_seconds = []
        while self.current_epoch < self.num_epochs:
            t0 = time.time()
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            for _ in range(self.num_iterations_per_epoch):
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                self.bench_train_iterations += 1
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = []
                for _ in range(self.num_val_iterations_per_epoch):
                    val_outputs.append(self.validation_step(next(self.dataloader_val)))
                    self.bench_val_iterations += 1
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()  # increments current_epoch
            epoch_seconds.append(time.time() - t0)
            fit = int((self.bench_deadline - time.time()) // epoch_seconds[-1])
            self.num_epochs = self.current_epoch + max(fit, 0)
            # the poly schedule is evaluated at the start of each epoch with step = epoch index
            self.lr_scheduler.max_steps = max(self.num_epochs, self.current_epoch + 1)
            self.print_to_log_file(
                f"budget: {max(fit, 0)} more epoch(s) fit before the deadline; num_epochs={self.num_epochs}"
            )
        self.on_train_end()
        if self.bench_summary and self.local_rank == 0:
            summary = {
                "configuration": self.configuration_name,
                "epochs": self.current_epoch,
                "train_iterations": self.bench_train_iterations,
                "val_iterations": self.bench_val_iterations,
                "batch_size": int(self.batch_size),
                "patch_size": [int(p) for p in self.configuration_manager.patch_size],
                "seconds_setup": first_epoch - started,
                "seconds_epochs": epoch_seconds,
                "seconds_total": time.time() - started,
                "threads": torch.get_num_threads(),
            }
            with open(self.bench_summary, "w") as fh:
                json.dump(summary, fh, indent=2)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file(
            "benchmark trainer: final validation skipped (the benchmark evaluates on test)"
        )
