# A site's SuperNode: Flower's image plus this project and a CPU torch (the ClientApp runs in a
# subprocess of the SuperNode; runtime dependency installation stays disabled).
FROM flwr/supernode:1.42.0
USER root
WORKDIR /opt/pft
COPY pyproject.toml LICENSE README.md ./
COPY pft_core ./pft_core
COPY client ./client
COPY server ./server
COPY simulations ./simulations
COPY pft_cli ./pft_cli
RUN python -m pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && python -m pip install --no-cache-dir .
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
USER app
# Supervised: exits non-zero when its executor cannot run ClientApps (restart: unless-stopped).
ENTRYPOINT ["pft", "deploy", "supernode", "--"]
