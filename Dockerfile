# kvbus: the controller, the reference engine and the agent in one image; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
# The CPU build of torch, from PyTorch's own index: PyPI's default would pull a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY kvbus kvbus
COPY shared shared
COPY agent agent
COPY controller controller
COPY engine engine
COPY configs configs
RUN pip install --no-cache-dir .
RUN useradd --create-home kvbus
USER kvbus
ENTRYPOINT ["kvbus"]
