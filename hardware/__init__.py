"""The physical layer: the virtual GSM modem, its model profiles, and the SMS TPDU codec."""
