"""Sells through Odoo 16's JSON-RPC as the Point of Sale till does (scripts/odoo-catchup).

    odoo-catchup-till.py URL sell ORDERS SEED
    odoo-catchup-till.py URL install MODULE

`sell` opens the shop's session, sends ORDERS orders one `pos.order.create_from_ui` call
each (3 lines of storable products, paid by bank), then closes the session, which posts its
journal entries and moves the stock. `install` installs a module as the Apps menu does.
Run with Odoo's own Python (it has `requests`).
"""
import datetime
import itertools
import random
import sys
import time
import uuid

import requests


class Odoo:
    def __init__(self, url, db, login, password):
        self.url, self.http, self.ids = url, requests.Session(), itertools.count(1)
        self.uid = self.call("/web/session/authenticate", db=db, login=login, password=password)["uid"]

    def call(self, path, **params):
        r = self.http.post(self.url + path, json={"jsonrpc": "2.0", "method": "call", "id": next(self.ids), "params": params})
        r.raise_for_status()
        answer = r.json()
        if "error" in answer:
            data = answer["error"].get("data") or {}
            sys.exit(f"odoo-catchup-till: {path}: {data.get('name')}: {data.get('message')}")
        return answer.get("result")

    def kw(self, model, method, *args, **kwargs):
        return self.call(f"/web/dataset/call_kw/{model}/{method}", model=model, method=method, args=list(args), kwargs=kwargs)


def install(o, module):
    found = o.kw("ir.module.module", "search", [["name", "=", module]])
    if not found:
        sys.exit(f"odoo-catchup-till: no module {module}")
    started = time.time()
    o.kw("ir.module.module", "button_immediate_install", found)
    state = o.kw("ir.module.module", "read", found, ["state"])[0]["state"]
    print(f"till: {module} {state} in {time.time() - started:.1f} s", file=sys.stderr)


def sell(o, orders, seed):
    print(f"till: seed {seed}", file=sys.stderr)
    rnd = random.Random(seed)
    products = o.kw("product.product", "search_read",
                    [["available_in_pos", "=", True], ["detailed_type", "=", "product"]], ["lst_price"])
    o.kw("pos.config", "open_ui", [1])
    config = o.kw("pos.config", "read", [1], ["current_session_id", "pricelist_id"])[0]
    session = config["current_session_id"][0]
    if o.kw("pos.session", "read", [session], ["state"])[0]["state"] == "opening_control":
        o.kw("pos.session", "set_cashbox_pos", [session], 0.0, "opening")
    started = time.time()
    for i in range(orders):
        lines, total = [], 0.0
        for p in rnd.sample(products, 3):
            qty, price = rnd.randint(1, 3), p["lst_price"]
            total += qty * price
            lines.append([0, 0, {"product_id": p["id"], "qty": qty, "price_unit": price, "discount": 0,
                                 "price_subtotal": qty * price, "price_subtotal_incl": qty * price,
                                 "tax_ids": [[6, 0, []]]}])
        now = datetime.datetime.utcnow()
        ref = "%05d-001-%04d" % (session, i + 1)
        o.kw("pos.order", "create_from_ui", [{"id": ref, "to_invoice": False, "data": {
            "name": "Order " + ref, "uid": ref, "sequence_number": i + 1, "pos_session_id": session,
            "user_id": o.uid, "partner_id": False, "pricelist_id": config["pricelist_id"][0],
            "fiscal_position_id": False, "creation_date": now.isoformat(), "amount_paid": total,
            "amount_total": total, "amount_tax": 0.0, "amount_return": 0.0, "to_invoice": False,
            "lines": lines, "access_token": str(uuid.uuid4()),
            "statement_ids": [[0, 0, {"name": now.strftime("%Y-%m-%d %H:%M:%S"), "payment_method_id": 2,
                                      "amount": total}]]}}])
    sold = time.time()
    o.kw("pos.session", "post_closing_cash_details", [session], 0.0)
    o.kw("pos.session", "update_closing_control_state_session", [session], "closing")
    o.kw("pos.session", "close_session_from_ui", [session])
    print(f"till: {orders} orders in {sold - started:.1f} s, session closed in {time.time() - sold:.1f} s",
          file=sys.stderr)


def main():
    url, what = sys.argv[1], sys.argv[2]
    o = Odoo(url, "odoo", "admin", "admin")
    if what == "sell":
        sell(o, int(sys.argv[3]), int(sys.argv[4]))
    elif what == "install":
        install(o, sys.argv[3])
    else:
        sys.exit(f"odoo-catchup-till: {what}? (sell ORDERS SEED, or install MODULE)")


if __name__ == "__main__":
    main()
