"""Where metrics go."""

from dataclasses import dataclass

from verl_async.config._check import check_choice


@dataclass
class LoggingConfig:
    project: str = "verl_async"
    """wandb project name."""
    run_name: str = ""
    """Run name (empty: the output folder's name)."""
    wandb_mode: str = "offline"
    """offline (default; sync later with `wandb sync`), online, or disabled."""
    console: bool = True
    """Print a metrics line every step."""
    progress_bar: bool = True
    """Show a live progress bar."""
    plots: bool = True
    """Write PNG plots of reward, response length and loss at the end."""
    level: str = "INFO"
    """Python logging level."""

    def __post_init__(self) -> None:
        check_choice("logging.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        check_choice("logging.level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))
