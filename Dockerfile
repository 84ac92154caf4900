# One image for the head and the workers of a multi-node cluster.
#   CPU: docker build -t hlbd-ray .
#   GPU: docker build -t hlbd-ray:gpu --build-arg VARIANT=py311-gpu \
#          --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# The Ray version must match the one pyproject.toml pins (a test checks it).
ARG RAY_VERSION=2.60.0
ARG VARIANT=py311-cpu
FROM rayproject/ray:${RAY_VERSION}-${VARIANT}

# Where torch comes from: the CPU wheel index keeps the CPU image small.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/hlbd-ray
COPY --chown=ray:users pyproject.toml README.md ./
# hlbd_ray/hlbd_data holds the shipped HLBD files: package data, installed with the code.
COPY --chown=ray:users hlbd_ray ./hlbd_ray
COPY --chown=ray:users conf ./conf
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" .
# The installed package (not the source tree here) resolves every short name to a file.
RUN cd / && python -c "from hlbd_ray import hlbd_data as d; [open(d.resolve(d.PREFIX + n), 'rb').close() for n in d.FILES]"

# The dashboard must stay on the cluster's private network; see README (Security).
CMD ["bash"]
