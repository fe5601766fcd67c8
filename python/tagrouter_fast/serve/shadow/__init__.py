"""Shadow mode (docs/shadow.md): prove routing on the user's own traffic before switching.

`runner` decides which requests get a background call to the routed (or an explored) model and
has the judge compare it with the default model's answer; `config` reads ``[shadow]``; `judge`
is the paper's pairwise judge over HTTP; `spend` prices calls and holds the daily cap; `records`
reads the state files back; `groups` clusters tags into readable groups; `report` computes the
savings report from the state directory alone.
"""
