"""`tessera <command>`: the top floor. Each module parses one command group's arguments and wires
the packages below it together; nothing below imports this package."""
