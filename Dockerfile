# GPU image: NVIDIA's PyTorch container brings CUDA, cuDNN, NCCL and a CUDA build of torch.
#   docker build -t nnunet .
#   docker run --gpus all --ipc=host -v /path/to/data:/data -v /path/to/results:/results -it nnunet
FROM nvcr.io/nvidia/pytorch:24.10-py3

WORKDIR /workspace/nnunet
COPY requirements.txt .
# The base image's torch satisfies requirements.txt, so pip keeps it and adds the rest.
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
