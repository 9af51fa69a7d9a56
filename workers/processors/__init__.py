from workers.processors.sd3 import SD3SinkAttnProcessor, install_sd3_processors

__all__ = ["SD3SinkAttnProcessor", "install_sd3_processors"]
