"""Load-test harness for any OpenAI-compatible server (HTTP only): datasets, load shapes, metrics, reports."""
