"""Forward: the gateway's calls to its backends. One HTTP client (`client`: aiohttp's pooled
connections), the configured backends (`backends`), faults classified once and translated once
(`faults`), and the forwarder (`forwarder`: deadlines, the fallback chain, stream relay)."""
