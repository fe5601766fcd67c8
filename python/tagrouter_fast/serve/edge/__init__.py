"""The gateway's protocol edge: each client protocol parsed into one internal request and back."""
