// A JMS consumer for the tests: reads a queue over OpenWire the way a Java application on ActiveMQ 5.x would,
// with TextMessage.getText(), and prints each message as one line of ASCII JSON for the test to parse.
//
//   java -cp <activemq client jars>:<dir> JmsRead URL USER PASSWORD QUEUE COUNT TIMEOUT_MS [SELECTOR]
//
// It stops after COUNT messages or TIMEOUT_MS, whichever comes first. A message whose getText() throws is
// printed as {"error": ...} (and the others are still read), so a test can tell which ones a consumer loses.

import java.util.ArrayList;
import java.util.Collections;
import java.util.Enumeration;
import java.util.List;

import javax.jms.Connection;
import javax.jms.JMSException;
import javax.jms.Message;
import javax.jms.MessageConsumer;
import javax.jms.Session;
import javax.jms.TextMessage;

import org.apache.activemq.ActiveMQConnectionFactory;

public final class JmsRead {
    public static void main(String[] args) throws Exception {
        if (args.length < 6 || args.length > 7) {
            System.err.println("usage: JmsRead URL USER PASSWORD QUEUE COUNT TIMEOUT_MS [SELECTOR]");
            System.exit(2);
        }
        int count = Integer.parseInt(args[4]);
        long deadline = System.currentTimeMillis() + Long.parseLong(args[5]);
        String selector = args.length == 7 ? args[6] : null;

        Connection connection = new ActiveMQConnectionFactory(args[1], args[2], args[0]).createConnection();
        try {
            connection.start();
            Session session = connection.createSession(false, Session.AUTO_ACKNOWLEDGE);
            MessageConsumer consumer = session.createConsumer(session.createQueue(args[3]), selector);
            for (int read = 0; read < count; read++) {
                long left = deadline - System.currentTimeMillis();
                Message message = left > 0 ? consumer.receive(left) : null;
                if (message == null) {
                    break;
                }
                System.out.println(describe(message));
            }
        } finally {
            connection.close();
        }
    }

    private static String describe(Message message) throws JMSException {
        StringBuilder out = new StringBuilder("{\"class\":").append(quote(message.getClass().getSimpleName()));
        out.append(",\"jms_type\":").append(quote(message.getJMSType()));
        out.append(",\"properties\":{");
        List<String> names = new ArrayList<>();
        for (Enumeration<?> e = message.getPropertyNames(); e.hasMoreElements(); ) {
            names.add((String) e.nextElement());
        }
        Collections.sort(names);
        for (int i = 0; i < names.size(); i++) {
            Object value = message.getObjectProperty(names.get(i));
            out.append(i == 0 ? "" : ",").append(quote(names.get(i))).append(':')
               .append(quote(value == null ? null : value.getClass().getSimpleName() + ":" + value));
        }
        out.append("},\"id\":").append(quote(message.getStringProperty("id")));
        if (message instanceof TextMessage) {
            try {
                String text = ((TextMessage) message).getText();
                out.append(",\"text\":").append(quote(text));
            } catch (JMSException e) {
                out.append(",\"error\":").append(quote(chain(e)));
            }
        }
        return out.append('}').toString();
    }

    // "JMSException: msg <- UTFDataFormatException: msg": the cause is what names the bug.
    private static String chain(Throwable e) {
        StringBuilder out = new StringBuilder();
        for (Throwable t = e; t != null; t = t.getCause() == t ? null : t.getCause()) {
            out.append(out.length() == 0 ? "" : " <- ").append(t.getClass().getSimpleName()).append(": ")
               .append(t.getMessage());
        }
        return out.toString();
    }

    // A JSON string with every non-ASCII UTF-16 unit escaped: astral characters come out as surrogate pairs,
    // which a JSON decoder joins again, so what getText() returned arrives unchanged and stdout stays ASCII.
    private static String quote(String s) {
        if (s == null) {
            return "null";
        }
        StringBuilder out = new StringBuilder(s.length() + 2).append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20 || c > 0x7e) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }
}
