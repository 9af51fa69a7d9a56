from orchestrate.cli import app

app()
