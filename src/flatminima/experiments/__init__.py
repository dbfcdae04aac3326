"""One module per reproduced claim: each runs, returns a table and draws a figure."""
