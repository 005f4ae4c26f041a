"""Lightning callbacks: Hugging Face checkpoint export, Pass@K during validation, and more."""
