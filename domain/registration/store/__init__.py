"""Every statement of the registration module on its schema (`registration`):
`store.catalog` (forms, rules, document types, agreements, invitation codes) and
`store.registrations` (registrations, their accounts, history, documents,
verifications, signatures and workflow step markers).

Functions take the caller's AsyncSession and never commit; reads return the
module's records (types.py), or None where nothing matches.
"""
