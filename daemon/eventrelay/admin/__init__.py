"""The admin side: the HTTP admin API the daemon serves (api.py, reading the service through view.py), and the
`eventrelay` commands that call it (commands.py, with client.py finding the daemon and printing.py its tables).

Nothing is imported here: the commands must not pay for the server's modules, nor the server for the client's.
"""
