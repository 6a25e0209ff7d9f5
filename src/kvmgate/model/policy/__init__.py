"""The option policy: the design note's three lists as data, with a typed grammar per option.

Pure code only: nothing here touches the host, so all of it is property-tested.
"""
