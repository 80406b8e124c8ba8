"""The HTTP API beside gRPC (`--http-port`): OpenAI's chat completions over Generate, Predict
as JSON, and a health check, served by a gRPC client of the server's own process."""
