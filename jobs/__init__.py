"""cdvm jobs: job kinds, sandbox backends, the in-sandbox runner, RAG and llama.cpp."""
