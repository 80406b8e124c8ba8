"""What tests and benches share: real servers on loopback, stand-ins for what cannot run
here (an OpenAI-compatible API, an Ollama server), and small bundles. Never shipped in an image."""
